// A minimal loader for an exported Relax VM library, used to run cross-built artifacts under
// qemu-user (no Python on the emulated side). It links only libtvm_ffi and libtvm_runtime.
//
// Usage: vm_runner MODULE.so INPUT.bin D0,D1,... OUTPUT.bin
// Feeds one float32 tensor of the given shape to `main` and writes its first output as raw
// float32 (native byte order).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM's generated kernels assume 64-byte aligned tensors.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = (ffi::GetDataSize(*tensor) + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, bytes);
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s MODULE.so INPUT.bin D0,D1,... OUTPUT.bin\n", argv[0]);
    return 2;
  }
  ffi::Module library = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // kDLCPU, device 0, pooled allocator.
  vm->GetFunction("vm_initialization").value()(1, 0, 2);

  std::vector<int64_t> shape = ParseShape(argv[3]);
  ffi::Tensor input = ffi::Tensor::FromNDAlloc(
      AlignedCPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), DLDataType{kDLFloat, 32, 1},
      DLDevice{kDLCPU, 0});
  std::ifstream in(argv[2], std::ios::binary);
  in.read(static_cast<char*>(input.data_ptr()),
          static_cast<std::streamsize>(ffi::GetDataSize(input)));
  if (!in) {
    std::fprintf(stderr, "%s: too short for shape %s\n", argv[2], argv[3]);
    return 1;
  }

  ffi::Any result = vm->GetFunction("main").value()(input);
  ffi::Tensor output;
  if (auto tensor = result.try_cast<ffi::Tensor>()) {
    output = *tensor;
  } else {
    output = result.cast<ffi::Array<ffi::Tensor>>()[0];
  }
  std::ofstream out(argv[4], std::ios::binary);
  out.write(static_cast<const char*>(output.data_ptr()),
            static_cast<std::streamsize>(ffi::GetDataSize(output)));
  return out ? 0 : 1;
}
