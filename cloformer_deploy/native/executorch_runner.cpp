// The ExecuTorch runner: a .pte loaded with the Program/Method API of the executorch wheel's own libraries
// (libexecutorch, its XNNPACK backend and kernels), served over the worker protocol of runner.h.
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include "runner.h"

#ifndef CFD_RUNTIME_VERSION
#define CFD_RUNTIME_VERSION "unknown"
#endif

// The wheel exports the thread pool's functions but ships no threadpool.h: the two calls used are declared here
// as the library exports them.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count();
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::Program;
using executorch::runtime::Span;
namespace etensor = executorch::runtime::etensor;

void check(Error e, const char* what) {
  if (e != Error::Ok) {
    char buf[160];
    snprintf(buf, sizeof buf, "%s failed: ExecuTorch error 0x%x", what, static_cast<unsigned>(e));
    throw std::runtime_error(buf);
  }
}

class ExecuTorchModel : public cfd::Model {
 public:
  ExecuTorchModel(const std::string& path, int threads) {
    if (threads > 0) {  // XNNPACK's pool is the process's, as in the Python runtime
      auto* pool = executorch::extension::threadpool::get_threadpool();
      if (pool) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
    }
    auto loader = MmapDataLoader::from(path.c_str(), MmapDataLoader::MlockConfig::NoMlock);
    check(loader.error(), "opening the program");
    loader_ = std::make_unique<MmapDataLoader>(std::move(loader.get()));
    auto program = Program::load(loader_.get());
    check(program.error(), "loading the program");
    program_ = std::make_unique<Program>(std::move(program.get()));
    auto meta = program_->method_meta("forward");
    check(meta.error(), "reading forward's metadata");
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); i++) {
      size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
      planned_bytes_ += size;
      buffers_.emplace_back(new uint8_t[size]);
      spans_.emplace_back(buffers_.back().get(), size);
    }
    planned_ = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(spans_.data(), spans_.size()));
    memory_ = std::make_unique<MemoryManager>(&method_allocator_, planned_.get(), &temp_allocator_);
    auto method = program_->load_method("forward", memory_.get());
    check(method.error(), "loading forward");
    method_ = std::make_unique<Method>(std::move(method.get()));
    auto input = meta->input_tensor_meta(0);
    check(input.error(), "reading forward's input");
    dtype_ = input->scalar_type();
    for (int32_t d : input->sizes()) input_sizes_.push_back(d);
    program_bytes_ = static_cast<size_t>(loader_->size().get());
  }

  std::string describe() override {
    return "\"method\": \"executorch\", \"runner\": \"native\", \"input_dtype\": " +
           cfd::quote(dtype_ == ScalarType::Half ? "float16" : "float32") +
           ", \"planned_arena_bytes\": " + std::to_string(planned_bytes_) +
           ", \"program_bytes\": " + std::to_string(program_bytes_);
  }

  std::vector<std::string> problems(const cfd::Json& spec) override {
    std::vector<std::string> out;
    if (method_->inputs_size() != 1) out.push_back("forward takes " + std::to_string(method_->inputs_size()) + " inputs, not 1");
    const cfd::Json* size = spec.get("input_size");
    const cfd::Json* batch = spec.get("batch");
    if (size && size->items.size() == 2 && input_sizes_.size() == 4) {
      int h = static_cast<int>(size->items[0].number), w = static_cast<int>(size->items[1].number);
      int b = batch && batch->kind == cfd::Json::Number ? static_cast<int>(batch->number) : input_sizes_[0];
      if (input_sizes_[0] != b || input_sizes_[1] != 3 || input_sizes_[2] != h || input_sizes_[3] != w)
        out.push_back("forward's input is not " + std::to_string(b) + "x3x" + std::to_string(h) + "x" + std::to_string(w));
    }
    return out;
  }

  void prepare(const cfd::FloatArray& tensor) override {
    if (tensor.shape.size() != input_sizes_.size() ||
        !std::equal(tensor.shape.begin(), tensor.shape.end(), input_sizes_.begin()))
      throw std::runtime_error("the batch's shape is not the program's input shape");
    sizes_.assign(input_sizes_.begin(), input_sizes_.end());
    dim_order_.resize(sizes_.size());
    for (size_t i = 0; i < dim_order_.size(); i++) dim_order_[i] = static_cast<uint8_t>(i);
    if (dtype_ == ScalarType::Half) {  // an fp16 program takes fp16 images, converted once here
      half_.resize(tensor.data.size());
      for (size_t i = 0; i < half_.size(); i++) half_[i] = cfd::to_half(tensor.data[i]);
      data_ = half_.data();
    } else {
      float_ = tensor.data;
      data_ = float_.data();
    }
    impl_ = std::make_unique<etensor::TensorImpl>(dtype_, static_cast<ssize_t>(sizes_.size()), sizes_.data(), data_,
                                                  dim_order_.data());
  }

  void infer() override {
    check(method_->set_input(EValue(etensor::Tensor(impl_.get())), 0), "setting the input");
    check(method_->execute(), "running forward");
  }

  size_t output_count() override { return method_->outputs_size(); }

  std::vector<float> output_at(size_t index, std::vector<int64_t>& shape) override {
    if (index >= method_->outputs_size()) throw std::runtime_error("forward has no output " + std::to_string(index));
    const EValue& value = method_->get_output(index);
    if (!value.isTensor()) throw std::runtime_error("forward's output is not a tensor");
    auto t = value.toTensor();
    shape.assign(t.sizes().begin(), t.sizes().end());
    std::vector<float> out(static_cast<size_t>(t.numel()));
    if (t.scalar_type() == ScalarType::Half) {
      const auto* p = reinterpret_cast<const uint16_t*>(t.const_data_ptr());
      for (size_t i = 0; i < out.size(); i++) out[i] = cfd::from_half(p[i]);
    } else if (t.scalar_type() == ScalarType::Float) {
      memcpy(out.data(), t.const_data_ptr(), out.size() * sizeof(float));
    } else {
      throw std::runtime_error("forward's output is neither float32 nor float16");
    }
    return out;
  }

 private:
  std::unique_ptr<MmapDataLoader> loader_;
  std::unique_ptr<Program> program_;
  std::vector<std::unique_ptr<uint8_t[]>> buffers_;
  std::vector<Span<uint8_t>> spans_;
  std::unique_ptr<HierarchicalAllocator> planned_;
  MallocMemoryAllocator method_allocator_, temp_allocator_;
  std::unique_ptr<MemoryManager> memory_;
  std::unique_ptr<Method> method_;
  ScalarType dtype_ = ScalarType::Float;
  std::vector<int32_t> input_sizes_, sizes_;
  std::vector<uint8_t> dim_order_;
  std::vector<float> float_;
  std::vector<uint16_t> half_;
  void* data_ = nullptr;
  std::unique_ptr<etensor::TensorImpl> impl_;
  size_t planned_bytes_ = 0, program_bytes_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::runtime_init();
  return cfd::serve(argc, argv, "executorch", CFD_RUNTIME_VERSION,
                    [](const std::string& path, int threads, const cfd::Json&) {
    return std::unique_ptr<cfd::Model>(new ExecuTorchModel(path, threads));
  });
}
