#include "lorafleet_native/batches.h"

#include <cstring>
#include <fstream>
#include <stdexcept>

namespace lorafleet::native {
namespace {

uint64_t le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

uint64_t Batches::count() const {
  const uint64_t per = uint64_t(batch_size) * seq_len;
  return per == 0 ? 0 : input_ids.size() / per;
}
const int64_t* Batches::ids(uint64_t i) const { return input_ids.data() + i * batch_size * seq_len; }
const int64_t* Batches::labels_of(uint64_t i) const { return labels.data() + i * batch_size * seq_len; }

Batches read_batches(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot open");
  const auto size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  uint8_t h[24];
  if (size < 24 || !in.read(reinterpret_cast<char*>(h), 24) || std::memcmp(h, "LFTB", 4) != 0)
    throw std::runtime_error(path + ": not a lorafleet token-batch file (no LFTB header)");
  if (le(h + 4, 4) != 1) throw std::runtime_error(path + ": token-batch version " + std::to_string(le(h + 4, 4)) +
                                                  " (this build reads version 1)");
  Batches b;
  b.batch_size = static_cast<uint32_t>(le(h + 8, 4));
  b.seq_len = static_cast<uint32_t>(le(h + 12, 4));
  const uint64_t n = le(h + 16, 8), per = uint64_t(b.batch_size) * b.seq_len;
  if (per == 0 || n == 0) throw std::runtime_error(path + ": holds no tokens");
  if (n > (size - 24) / (16 * per) || size - 24 != n * per * 16)
    throw std::runtime_error(path + ": size does not match its header (" + std::to_string(n) + " batches of " +
                             std::to_string(b.batch_size) + " x " + std::to_string(b.seq_len) + ")");
  b.input_ids.resize(n * per);
  b.labels.resize(n * per);
  std::vector<uint8_t> raw(per * 8);
  for (uint64_t i = 0; i < n; ++i) {
    for (auto* dst : {&b.input_ids, &b.labels}) {
      in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
      if (!in) throw std::runtime_error(path + ": truncated");
      for (uint64_t j = 0; j < per; ++j) (*dst)[i * per + j] = static_cast<int64_t>(le(raw.data() + 8 * j, 8));
    }
  }
  return b;
}

}  // namespace lorafleet::native
