// PEFT adapters as safetensors files: https://huggingface.co/docs/safetensors (8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the bytes).
// Reading is bounded and strict: adapters arrive from other parties.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lorafleet::native {

struct FloatTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major

  int64_t numel() const;
};

using TensorMap = std::map<std::string, FloatTensor>;

// Limits a reader enforces before allocating (a header is small; an adapter is far below a model).
constexpr uint64_t kMaxHeaderBytes = 16ull << 20;
constexpr uint64_t kMaxFileBytes = 8ull << 30;

// IEEE half precision to float (exact: every half is a float). Also used for float16 NumPy arrays.
float half_to_float(uint16_t h);

// Reads F32, F16 and BF16 tensors as float32; throws std::runtime_error with a one-line reason otherwise.
TensorMap read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

// Writes float32 tensors (keys sorted, 8-byte aligned header) to `path` through a temporary file and a rename.
void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata);

}  // namespace lorafleet::native
