// The LiteRT runner: a .tflite compiled through LiteRT's C API in the ai-edge-litert wheel's own libLiteRt.so
// (the CPU: XNNPACK, as the Python interpreter runs it; or the GPU accelerator the wheel ships, WebGPU on Vulkan),
// served over runner.h.
//
// No package ships LiteRT's C headers, so the few functions called are declared below, in the project's words,
// from what the library exports and LiteRT's public documentation says of them. Every handle made is destroyed.
#include <sys/syscall.h>

#include "runner.h"

#ifndef CFD_RUNTIME_VERSION
#define CFD_RUNTIME_VERSION "unknown"
#endif

extern "C" {
// Handles are opaque pointers; every call returns a status, 0 for success.
typedef int LrStatus;
typedef void* LrHandle;

// An environment option: a tag and a tagged value (LiteRT's LiteRtEnvOption holding a LiteRtAny).
struct LrValue {
  int type;  // 2: an integer
  int64_t integer;
};
struct LrEnvOption {
  int tag;
  LrValue value;
};

// A tensor's type as the library writes it: the element type, then the layout (rank in the low 7 bits of the
// first byte, 8 dimensions, 8 strides).
struct LrTensorType {
  int32_t element;  // 1: float32
  uint8_t rank_bits;
  uint8_t pad[3];
  int32_t dims[8];
  uint32_t strides[8];
};
static_assert(sizeof(LrTensorType) == 72, "LiteRT's ranked tensor type is 72 bytes");

LrStatus LiteRtCreateEnvironment(int count, const LrEnvOption* options, LrHandle* env);
void LiteRtDestroyEnvironment(LrHandle env);
LrStatus LiteRtCreateModelFromFile(LrHandle env, const char* path, LrHandle* model);
void LiteRtDestroyModel(LrHandle model);
LrStatus LiteRtCreateOptions(LrHandle* options);
void LiteRtDestroyOptions(LrHandle options);
LrStatus LiteRtSetOptionsHardwareAccelerators(LrHandle options, int accelerators);
LrStatus LiteRtCreateOpaqueOptions(const char* identifier, void* payload, void (*free_payload)(void*),
                                   LrHandle* opaque);
void LiteRtDestroyOpaqueOptions(LrHandle opaque);
LrStatus LiteRtAddOpaqueOptions(LrHandle options, LrHandle opaque);  // the options own it from here
LrStatus LiteRtCreateCompiledModel(LrHandle env, LrHandle model, LrHandle options, LrHandle* compiled);
void LiteRtDestroyCompiledModel(LrHandle compiled);
LrStatus LiteRtGetNumModelSignatures(LrHandle model, size_t* count);
LrStatus LiteRtGetModelSignature(LrHandle model, size_t index, LrHandle* signature);  // owned by the model
LrStatus LiteRtGetNumSignatureInputs(LrHandle signature, size_t* count);
LrStatus LiteRtGetNumSignatureOutputs(LrHandle signature, size_t* count);
LrStatus LiteRtGetSignatureInputTensorByIndex(LrHandle signature, size_t index, LrHandle* tensor);
LrStatus LiteRtGetSignatureOutputTensorByIndex(LrHandle signature, size_t index, LrHandle* tensor);
LrStatus LiteRtGetRankedTensorType(LrHandle tensor, LrTensorType* type);
LrStatus LiteRtCreateTensorBufferFromHostMemory(const LrTensorType* type, void* memory, size_t bytes,
                                                void (*deallocator)(void*), LrHandle* buffer);
void LiteRtDestroyTensorBuffer(LrHandle buffer);
LrStatus LiteRtRunCompiledModel(LrHandle compiled, size_t signature, size_t inputs, LrHandle* input_buffers,
                                size_t outputs, LrHandle* output_buffers);
}

namespace {

constexpr int kCpu = 1, kGpu = 2;  // hardware accelerator bits
constexpr int kAnyInteger = 2;
constexpr int kAutoRegisterAccelerators = 24, kMinLogSeverity = 25;  // environment option tags
constexpr int kWarning = 2;
// element types (LiteRT's numbering, TFLite's): the ones an output of ours may hold
constexpr int kFloat32 = 1, kInt32 = 2, kUInt8 = 3, kInt16 = 7, kInt8 = 9, kFloat16 = 10;

size_t element_bytes(int element) {
  switch (element) {
    case kFloat32: case kInt32: return 4;
    case kInt16: case kFloat16: return 2;
    case kUInt8: case kInt8: return 1;
    default: throw std::runtime_error("an output's element type (" + std::to_string(element) + ") is not one the runner reads");
  }
}
constexpr size_t kAlignment = 64;  // LiteRT's host buffers are 64-byte aligned
// The GPU accelerator's precision option: 1 computes in fp16 (its default on a GPU that has fp16), 2 in fp32
constexpr int kGpuFp16 = 1, kGpuFp32 = 2;

const char* status_name(LrStatus s) {
  switch (s) {
    case 1: return "invalid argument";
    case 2: return "memory allocation failure";
    case 3: return "runtime failure";
    case 4: return "missing input tensor";
    case 5: return "unsupported";
    case 6: return "not found";
    case 500: return "file I/O error";
    case 501: return "invalid flatbuffer";
    case 504: return "compilation failed";
    default: return "error";
  }
}

void check(LrStatus s, const char* what, const std::string& why = "") {
  if (s != 0)
    throw std::runtime_error(std::string(what) + " failed: LiteRT " + status_name(s) + " (" + std::to_string(s) +
                             ")" + (why.empty() ? "" : ": " + why));
}

// What LiteRT writes to stderr while a step runs, kept (and passed on to stderr): the GPU accelerator says which
// adapter it chose, and why it failed, only there.
class StderrCapture {
 public:
  StderrCapture() {
    fflush(stderr);
    saved_ = dup(2);
    // a file in memory: tmpfile() needs a /tmp, which Android and small devices may not have
    int fd = static_cast<int>(syscall(SYS_memfd_create, "litert-log", 0));
    file_ = fd >= 0 ? fdopen(fd, "w+") : tmpfile();
    if (!file_ && fd >= 0) close(fd);
    captured_ = saved_ >= 0 && file_ && dup2(fileno(file_), 2) >= 0;
    if (!captured_) stop();
  }
  bool captured() const { return captured_; }
  ~StderrCapture() { stop(); }
  std::string stop() {
    if (saved_ >= 0) {
      fflush(stderr);
      dup2(saved_, 2);
      close(saved_);
      saved_ = -1;
    }
    if (file_) {
      rewind(file_);
      char buf[4096];
      size_t n;
      while ((n = fread(buf, 1, sizeof buf, file_)) > 0) text_.append(buf, n);
      fclose(file_);
      file_ = nullptr;
      fputs(text_.c_str(), stderr);
    }
    return text_;
  }

 private:
  int saved_ = -1;
  FILE* file_ = nullptr;
  bool captured_ = false;
  std::string text_;
};

// The text after ``key`` on the last line that has it, to the line's end ("" if none)
std::string after(const std::string& text, const std::string& key) {
  size_t at = text.rfind(key);
  if (at == std::string::npos) return "";
  size_t start = at + key.size(), end = text.find('\n', start);
  return cfd::trim(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
}

// The message of LiteRT's last error line ("E0000 ... file.cc:123] message"), for a failure's one line
std::string last_error(const std::string& text) {
  std::string found;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.size() > 1 && line[0] == 'E' && isdigit(static_cast<unsigned char>(line[1]))) {
      size_t at = line.find("] ");
      if (at != std::string::npos) found = line.substr(at + 2);
    }
  }
  return found;
}

// An opaque option's payload: a TOML text the options free with libc's free
void add_toml(LrHandle options, const char* identifier, const std::string& toml) {
  char* payload = strdup(toml.c_str());
  LrHandle opaque = nullptr;
  LrStatus s = LiteRtCreateOpaqueOptions(identifier, payload, free, &opaque);
  if (s != 0) {
    free(payload);
    check(s, "making the accelerator's options");
  }
  s = LiteRtAddOpaqueOptions(options, opaque);
  if (s != 0) {
    LiteRtDestroyOpaqueOptions(opaque);
    check(s, "adding the accelerator's options");
  }
}

std::vector<int32_t> dims_of(const LrTensorType& t) {
  return std::vector<int32_t>(t.dims, t.dims + std::min<int>(t.rank_bits & 0x7F, 8));
}

size_t count_of(const std::vector<int32_t>& dims) {
  size_t n = 1;
  for (int32_t d : dims) n *= static_cast<size_t>(d > 0 ? d : 0);
  return n;
}

// A float32 host buffer, 64-byte aligned, that a LiteRT tensor buffer wraps without copying.
struct HostBuffer {
  std::vector<float> storage;
  float* data = nullptr;
  size_t count = 0;
  void resize(size_t n) {
    count = n;
    storage.assign(n + kAlignment / sizeof(float), 0.0f);
    uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    data = reinterpret_cast<float*>((p + kAlignment - 1) / kAlignment * kAlignment);
  }
};

class LiteRtModel : public cfd::Model {
 public:
  LiteRtModel(const std::string& path, int threads, const cfd::Json& open) {
    const cfd::Json* accelerator = open.get("accelerator");
    gpu_ = accelerator && accelerator->kind == cfd::Json::String && accelerator->text == "gpu";
    if (accelerator && accelerator->kind == cfd::Json::String && !gpu_ && accelerator->text != "cpu")
      throw std::runtime_error("bad message: the accelerator is neither cpu nor gpu");
    const cfd::Json* precision = open.get("gpu_precision");
    gpu_fp32_ = precision && precision->kind == cfd::Json::String && precision->text == "fp32";
    if (precision && precision->kind != cfd::Json::Null &&
        !(precision->kind == cfd::Json::String && (precision->text == "fp32" || precision->text == "fp16")))
      throw std::runtime_error("bad message: the GPU precision is neither fp16 nor fp32");
    threads_ = threads;
    try {
      build(path);
    } catch (...) {
      release();  // a constructor that throws runs no destructor
      throw;
    }
  }

  ~LiteRtModel() override { release(); }

  void build(const std::string& path) {
    // look for the accelerators used only (no search for NPU libraries); no informational log lines
    LrEnvOption env_options[2] = {{kAutoRegisterAccelerators, {kAnyInteger, gpu_ ? (kCpu | kGpu) : kCpu}},
                                  {kMinLogSeverity, {kAnyInteger, kWarning}}};
    check(LiteRtCreateEnvironment(2, env_options, &env_), "starting LiteRT");
    check(LiteRtCreateModelFromFile(env_, path.c_str(), &model_), "opening the model");
    size_t signatures = 0;
    check(LiteRtGetNumModelSignatures(model_, &signatures), "counting the signatures");
    if (signatures < 1) throw std::runtime_error("the model has no signature");
    LrHandle signature = nullptr;
    check(LiteRtGetModelSignature(model_, 0, &signature), "reading the signature");
    check(LiteRtGetNumSignatureInputs(signature, &inputs_), "counting the inputs");
    check(LiteRtGetNumSignatureOutputs(signature, &outputs_), "counting the outputs");
    if (inputs_ < 1 || outputs_ < 1) throw std::runtime_error("the model has no input or no output");
    LrHandle tensor = nullptr;
    check(LiteRtGetSignatureInputTensorByIndex(signature, 0, &tensor), "reading the input");
    check(LiteRtGetRankedTensorType(tensor, &input_type_), "reading the input's type");
    output_types_.resize(outputs_);
    for (size_t i = 0; i < outputs_; i++) {  // beyond the first: a file's block boundaries
      check(LiteRtGetSignatureOutputTensorByIndex(signature, i, &tensor), "reading an output");
      check(LiteRtGetRankedTensorType(tensor, &output_types_[i]), "reading an output's type");
    }
    output_type_ = output_types_[0];

    check(LiteRtCreateOptions(&options_), "making the options");
    if (gpu_) {
      // the GPU alone: a model it cannot take whole fails here rather than running partly on the CPU unseen
      check(LiteRtSetOptionsHardwareAccelerators(options_, kGpu), "choosing the GPU");
      add_toml(options_, "gpu_options", "precision = " + std::to_string(gpu_fp32_ ? kGpuFp32 : kGpuFp16) + "\n");
    } else {
      check(LiteRtSetOptionsHardwareAccelerators(options_, kCpu), "choosing the CPU");
      if (threads_ > 0) add_toml(options_, "xnnpack", "num_threads = " + std::to_string(threads_) + "\n");
    }
    StderrCapture said;
    LrStatus compiled = LiteRtCreateCompiledModel(env_, model_, options_, &compiled_);
    if (compiled != 0) {
      std::string why = last_error(said.stop());
      if (gpu_ && (why.empty() || why.find("WebGPU environment") != std::string::npos))
        why += " (no Vulkan device reached: this machine needs a Vulkan loader, libvulkan.so.1, and a driver)";
      check(compiled, gpu_ ? "compiling the model for the GPU" : "compiling the model for the CPU", why);
    }

    if (input_type_.element == kFloat32 && output_type_.element == kFloat32) {
      input_.resize(count_of(dims_of(input_type_)));
      check(LiteRtCreateTensorBufferFromHostMemory(&input_type_, input_.data, input_.count * sizeof(float), nullptr,
                                                   &input_buffer_),
            "making the input buffer");
      outputs_host_.resize(outputs_);
      output_buffers_.assign(outputs_, nullptr);
      for (size_t i = 0; i < outputs_; i++) {
        size_t bytes = count_of(dims_of(output_types_[i])) * element_bytes(output_types_[i].element);
        outputs_host_[i].resize((bytes + sizeof(float) - 1) / sizeof(float));
        check(LiteRtCreateTensorBufferFromHostMemory(&output_types_[i], outputs_host_[i].data, bytes, nullptr,
                                                     &output_buffers_[i]),
              "making an output buffer");
      }
    }
    if (gpu_ && input_buffer_) {
      // the GPU accelerator picks its adapter and builds its shaders at the first run: part of loading, as an app
      // warms up its model, and the only place the adapter is named
      bool read = said.captured();
      LrStatus ran = LiteRtRunCompiledModel(compiled_, 0, 1, &input_buffer_, outputs_, output_buffers_.data());
      std::string text = said.stop();
      check(ran, "the GPU's first run", last_error(text));
      adapter_ = after(text, "Selected adapter: ");
      adapter_read_ = read;
    }
  }

  void release() {
    if (input_buffer_) LiteRtDestroyTensorBuffer(input_buffer_);
    for (LrHandle& buffer : output_buffers_) {
      if (buffer) LiteRtDestroyTensorBuffer(buffer);
      buffer = nullptr;
    }
    if (compiled_) LiteRtDestroyCompiledModel(compiled_);
    if (options_) LiteRtDestroyOptions(options_);
    if (model_) LiteRtDestroyModel(model_);
    if (env_) LiteRtDestroyEnvironment(env_);
    input_buffer_ = compiled_ = options_ = model_ = env_ = nullptr;
  }

  std::string describe() override {
    std::string out = "\"method\": \"litert\", \"runner\": \"native\", \"ai-edge-litert\": " +
                      cfd::quote(CFD_RUNTIME_VERSION) + ", \"accelerator\": " + cfd::quote(gpu_ ? "gpu" : "cpu");
    if (gpu_) {
      out += ", \"gpu_precision\": " + cfd::quote(gpu_fp32_ ? "fp32" : "fp16");
      // "llvmpipe (LLVM 15.0.6, 256 bits), arch=software, vendor=mesa, backend=Vulkan, adapterType=CPU / Software";
      // null where LiteRT's log could not be read or named none: unknown, not a hardware GPU
      bool named = adapter_read_ && !adapter_.empty();
      out += ", \"gpu_adapter\": " + (named ? cfd::quote(adapter_) : std::string("null")) + ", \"gpu_software\": " +
             (!named ? "null" : adapter_.find("adapterType=CPU") != std::string::npos ? "true" : "false");
    }
    return out;
  }

  std::vector<std::string> problems(const cfd::Json& spec) override {
    std::vector<std::string> out;
    if (inputs_ != 1) out.push_back("the model takes " + std::to_string(inputs_) + " inputs, not 1");
    if (input_type_.element != kFloat32) out.push_back("the input is not float32");
    if (output_type_.element != kFloat32) out.push_back("the output is not float32");
    std::vector<int32_t> dims = dims_of(input_type_);
    if (dims.size() != 4 || dims[3] != 3) {
      out.push_back("the input is not NHWC with 3 channels");
    } else if (const cfd::Json* size = spec.get("input_size")) {
      if (size->items.size() == 2 && (dims[1] != static_cast<int32_t>(size->items[0].number) ||
                                      dims[2] != static_cast<int32_t>(size->items[1].number)))
        out.push_back("the input is not " + std::to_string(static_cast<int>(size->items[0].number)) + "x" +
                      std::to_string(static_cast<int>(size->items[1].number)));
    }
    return out;
  }

  void prepare(const cfd::FloatArray& tensor) override {
    // the host sends NCHW (every format's batch); the model takes NHWC: transposed once here, not when timed
    std::vector<int32_t> dims = dims_of(input_type_);
    if (!input_buffer_ || dims.size() != 4 || tensor.shape.size() != 4 || tensor.shape[0] != dims[0] ||
        tensor.shape[1] != dims[3] || tensor.shape[2] != dims[1] || tensor.shape[3] != dims[2])
      throw std::runtime_error("the batch's shape is not the model's input shape");
    const size_t n = dims[0], h = dims[1], w = dims[2], c = dims[3];
    for (size_t b = 0; b < n; b++)
      for (size_t k = 0; k < c; k++)
        for (size_t y = 0; y < h; y++)
          for (size_t x = 0; x < w; x++)
            input_.data[((b * h + y) * w + x) * c + k] = tensor.data[((b * c + k) * h + y) * w + x];
  }

  void infer() override {
    check(LiteRtRunCompiledModel(compiled_, 0, 1, &input_buffer_, outputs_, output_buffers_.data()),
          "running the model");
  }

  size_t output_count() override { return outputs_; }

  std::vector<float> output_at(size_t index, std::vector<int64_t>& shape) override {
    if (index >= outputs_host_.size()) throw std::runtime_error("no output " + std::to_string(index));
    const LrTensorType& type = output_types_[index];
    std::vector<int32_t> dims = dims_of(type);
    shape.assign(dims.begin(), dims.end());
    const size_t n = count_of(dims);
    const void* p = outputs_host_[index].data;
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) {
      switch (type.element) {
        case kFloat32: out[i] = static_cast<const float*>(p)[i]; break;
        case kFloat16: out[i] = cfd::from_half(static_cast<const uint16_t*>(p)[i]); break;
        case kInt8: out[i] = static_cast<const int8_t*>(p)[i]; break;
        case kUInt8: out[i] = static_cast<const uint8_t*>(p)[i]; break;
        case kInt16: out[i] = static_cast<const int16_t*>(p)[i]; break;
        default: out[i] = static_cast<float>(static_cast<const int32_t*>(p)[i]); break;
      }
    }
    return out;
  }

 private:
  bool gpu_ = false, gpu_fp32_ = false;
  int threads_ = 0;
  std::string adapter_;
  bool adapter_read_ = false;
  LrHandle env_ = nullptr, model_ = nullptr, options_ = nullptr, compiled_ = nullptr;
  LrHandle input_buffer_ = nullptr;
  std::vector<LrHandle> output_buffers_;
  LrTensorType input_type_{}, output_type_{};
  std::vector<LrTensorType> output_types_;
  size_t inputs_ = 0, outputs_ = 0;
  HostBuffer input_;
  std::vector<HostBuffer> outputs_host_;
};

}  // namespace

int main(int argc, char** argv) {
  return cfd::serve(argc, argv, "ai-edge-litert", CFD_RUNTIME_VERSION,
                    [](const std::string& path, int threads, const cfd::Json& open) {
                      return std::unique_ptr<cfd::Model>(new LiteRtModel(path, threads, open));
                    });
}
