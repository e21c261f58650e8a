// The ONNX Runtime runner: an .onnx opened through ONNX Runtime's C API in the onnxruntime wheel's own
// libonnxruntime.so, with the session options of the Python runner (formats/onnx.py), served over runner.h.
// The C API header comes from Debian's libonnxruntime-dev at set-up time: the wheel carries none. Its API
// version is older than the library's, which serves every older version; the runner asks for the oldest version
// the project admits (onnxruntime 1.20), and calls nothing newer.
#include <onnxruntime_c_api.h>

#include "runner.h"

namespace {

const OrtApi* api = nullptr;

void check(OrtStatus* status, const char* what) {
  if (status) {
    std::string message = std::string(what) + " failed: " + api->GetErrorMessage(status);
    api->ReleaseStatus(status);
    throw std::runtime_error(message);
  }
}

class OnnxModel : public cfd::Model {
 public:
  OnnxModel(const std::string& path, int threads) {
    try {
      open(path, threads);
    } catch (...) {
      release();  // a constructor that throws runs no destructor
      throw;
    }
  }

  ~OnnxModel() override { release(); }

  void open(const std::string& path, int threads) {
    check(api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "cloformer-deploy", &env_), "starting ONNX Runtime");
    OrtSessionOptions* options = nullptr;
    check(api->CreateSessionOptions(&options), "making the session options");
    if (threads > 0) {
      check(api->SetIntraOpNumThreads(options, threads), "setting the thread count");
      check(api->SetInterOpNumThreads(options, 1), "setting the inter-op thread count");
    }
    OrtStatus* opened = api->CreateSession(env_, path.c_str(), options, &session_);
    api->ReleaseSessionOptions(options);
    check(opened, "opening the model");
    check(api->GetAllocatorWithDefaultOptions(&allocator_), "getting the allocator");
    check(api->SessionGetInputCount(session_, &inputs_), "counting the inputs");
    check(api->SessionGetInputName(session_, 0, allocator_, &input_name_), "reading the input's name");
    size_t outputs = 0;
    check(api->SessionGetOutputCount(session_, &outputs), "counting the outputs");
    for (size_t i = 0; i < outputs; i++) {  // beyond the first: a file's block boundaries
      char* name = nullptr;
      check(api->SessionGetOutputName(session_, i, allocator_, &name), "reading an output's name");
      output_names_.push_back(name);
    }
    outputs_.assign(outputs, nullptr);
    OrtTypeInfo* info = nullptr;
    check(api->SessionGetInputTypeInfo(session_, 0, &info), "reading the input's type");
    const OrtTensorTypeAndShapeInfo* tensor = nullptr;
    check(api->CastTypeInfoToTensorInfo(info, &tensor), "reading the input's tensor type");
    check(api->GetTensorElementType(tensor, &input_type_), "reading the input's element type");
    size_t dims = 0;
    check(api->GetDimensionsCount(tensor, &dims), "reading the input's rank");
    input_shape_.resize(dims);
    check(api->GetDimensions(tensor, input_shape_.data(), dims), "reading the input's shape");
    api->ReleaseTypeInfo(info);
    check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory_), "describing CPU memory");
  }

  void release() {
    if (input_) api->ReleaseValue(input_);
    release_outputs();
    if (memory_) api->ReleaseMemoryInfo(memory_);
    if (allocator_) {
      if (input_name_) allocator_->Free(allocator_, input_name_);
      for (const char* name : output_names_) allocator_->Free(allocator_, const_cast<char*>(name));
    }
    output_names_.clear();
    if (session_) api->ReleaseSession(session_);
    if (env_) api->ReleaseEnv(env_);
    input_ = nullptr;
    memory_ = nullptr;
    input_name_ = nullptr;
    allocator_ = nullptr;
    session_ = nullptr;
    env_ = nullptr;
  }

  std::string describe() override {
    return "\"method\": \"onnxruntime\", \"runner\": \"native\", \"providers\": [\"CPUExecutionProvider\"], "
           "\"onnxruntime\": " + cfd::quote(OrtGetApiBase()->GetVersionString());
  }

  std::vector<std::string> problems(const cfd::Json& spec) override {
    std::vector<std::string> out;
    if (inputs_ != 1) out.push_back("the model takes " + std::to_string(inputs_) + " inputs, not 1");
    if (input_type_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) out.push_back("the model's input is not float32");
    const cfd::Json* size = spec.get("input_size");
    if (size && size->items.size() == 2 && input_shape_.size() == 4) {
      int64_t h = static_cast<int64_t>(size->items[0].number), w = static_cast<int64_t>(size->items[1].number);
      if ((input_shape_[2] > 0 && input_shape_[2] != h) || (input_shape_[3] > 0 && input_shape_[3] != w))
        out.push_back("the model's input is not " + std::to_string(h) + "x" + std::to_string(w));
    }
    return out;
  }

  void prepare(const cfd::FloatArray& tensor) override {
    data_ = tensor.data;
    shape_ = tensor.shape;
    if (input_) api->ReleaseValue(input_);
    input_ = nullptr;
    check(api->CreateTensorWithDataAsOrtValue(memory_, data_.data(), data_.size() * sizeof(float), shape_.data(),
                                              shape_.size(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input_),
          "making the input");
  }

  void infer() override {
    release_outputs();  // as the Python runner: ONNX Runtime allocates each run's outputs
    const char* in[] = {input_name_};
    check(api->Run(session_, nullptr, in, &input_, 1, output_names_.data(), output_names_.size(), outputs_.data()),
          "running the model");
  }

  void release_outputs() {
    for (OrtValue*& value : outputs_) {
      if (value) api->ReleaseValue(value);
      value = nullptr;
    }
  }

  size_t output_count() override { return outputs_.size(); }

  std::vector<float> output_at(size_t index, std::vector<int64_t>& shape) override {
    if (index >= outputs_.size() || !outputs_[index]) throw std::runtime_error("no output " + std::to_string(index));
    OrtValue* output = outputs_[index];
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(api->GetTensorTypeAndShape(output, &info), "reading the output's shape");
    size_t dims = 0, count = 0;
    ONNXTensorElementDataType type;
    OrtStatus* read = api->GetDimensionsCount(info, &dims);
    if (!read) {
      shape.resize(dims);
      read = api->GetDimensions(info, shape.data(), dims);
    }
    if (!read) read = api->GetTensorShapeElementCount(info, &count);
    if (!read) read = api->GetTensorElementType(info, &type);
    api->ReleaseTensorTypeAndShapeInfo(info);
    check(read, "reading the output's type");
    void* p = nullptr;
    check(api->GetTensorMutableData(output, &p), "reading the output");
    std::vector<float> out(count);
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      memcpy(out.data(), p, count * sizeof(float));
    } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      for (size_t i = 0; i < count; i++) out[i] = cfd::from_half(static_cast<const uint16_t*>(p)[i]);
    } else {
      throw std::runtime_error("the model's output is neither float32 nor float16");
    }
    return out;
  }

 private:
  OrtEnv* env_ = nullptr;
  OrtSession* session_ = nullptr;
  OrtAllocator* allocator_ = nullptr;
  OrtMemoryInfo* memory_ = nullptr;
  OrtValue* input_ = nullptr;
  std::vector<OrtValue*> outputs_;
  char* input_name_ = nullptr;
  std::vector<const char*> output_names_;
  size_t inputs_ = 0;
  ONNXTensorElementDataType input_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> input_shape_, shape_;
  std::vector<float> data_;
};

}  // namespace

constexpr uint32_t kApiVersion = 20;  // onnxruntime 1.20, pyproject's lower bound
static_assert(kApiVersion <= ORT_API_VERSION, "the header is older than the API the runner asks for");

int main(int argc, char** argv) {
  api = OrtGetApiBase()->GetApi(kApiVersion);
  if (!api) {
    fprintf(stderr, "this libonnxruntime does not serve C API version %u\n", kApiVersion);
    return 3;
  }
  const std::string version = OrtGetApiBase()->GetVersionString();
  return cfd::serve(argc, argv, "onnxruntime", version,
                    [](const std::string& path, int threads, const cfd::Json&) {
    return std::unique_ptr<cfd::Model>(new OnnxModel(path, threads));
  });
}
