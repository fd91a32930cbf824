#include "lorafleet_native/safetensors.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace lorafleet::native {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw std::runtime_error(path + ": " + why);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int64_t FloatTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

TensorMap read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) fail(path, "cannot open");
  const auto size = static_cast<uint64_t>(in.tellg());
  if (size < 8) fail(path, "not a safetensors file (shorter than its 8-byte header length)");
  if (size > kMaxFileBytes) fail(path, "larger than the " + std::to_string(kMaxFileBytes >> 30) + " GiB limit");
  in.seekg(0);
  uint8_t len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) fail(path, "header length out of bounds");
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  json h = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded() || !h.is_object()) fail(path, "header is not a JSON object");
  const uint64_t data_start = 8 + header_len, data_len = size - data_start;

  TensorMap out;
  for (auto& [name, info] : h.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) fail(path, "__metadata__ is not an object");
      for (auto& [k, v] : info.items()) {
        if (!v.is_string()) fail(path, "__metadata__." + k + " is not a string");
        if (metadata) (*metadata)[k] = v.get<std::string>();
      }
      continue;
    }
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets"))
      fail(path, name + ": entry lacks dtype, shape or data_offsets");
    const auto& dt = info["dtype"];
    const auto& shp = info["shape"];
    const auto& off = info["data_offsets"];
    if (!dt.is_string() || !shp.is_array() || !off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      fail(path, name + ": malformed entry");
    const std::string dtype = dt.get<std::string>();
    size_t elem = dtype == "F32" ? 4 : (dtype == "F16" || dtype == "BF16") ? 2 : 0;
    if (elem == 0) fail(path, name + ": dtype " + dtype + " is not a float type (F32, F16, BF16)");
    FloatTensor t;
    uint64_t numel = 1;
    for (const auto& d : shp) {
      if (!d.is_number_unsigned()) fail(path, name + ": shape holds a non-integer");
      const uint64_t v = d.get<uint64_t>();
      if (v != 0 && numel > (std::numeric_limits<uint64_t>::max() / 8) / v) fail(path, name + ": shape overflows");
      numel *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_len || end - begin != numel * elem)
      fail(path, name + ": data_offsets do not match its shape and dtype or lie outside the file");
    std::vector<uint8_t> raw(end - begin);
    in.seekg(static_cast<std::streamoff>(data_start + begin));
    in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    if (!in) fail(path, name + ": truncated data");
    t.data.resize(numel);
    for (uint64_t i = 0; i < numel; ++i) {
      const uint8_t* p = raw.data() + i * elem;
      if (elem == 4) {
        uint32_t bits = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
        std::memcpy(&t.data[i], &bits, 4);
      } else {
        const uint16_t bits = static_cast<uint16_t>(p[0] | p[1] << 8);
        t.data[i] = dtype == "F16" ? half_to_float(bits) : bf16_to_float(bits);
      }
      if (!std::isfinite(t.data[i])) fail(path, name + ": holds a non-finite value");
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {  // std::map: sorted keys
    if (static_cast<int64_t>(t.data.size()) != t.numel()) throw std::runtime_error(name + ": data size != shape");
    h[name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.data.size() * 4}}};
    offset += t.data.size() * 4;
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // the format pads the header with spaces to 8 bytes
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(tmp, "cannot create");
    uint8_t len_bytes[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(len_bytes), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& [name, t] : tensors) {
      for (float f : t.data) {
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        const uint8_t b[4] = {uint8_t(bits), uint8_t(bits >> 8), uint8_t(bits >> 16), uint8_t(bits >> 24)};
        out.write(reinterpret_cast<const char*>(b), 4);
      }
    }
    out.flush();
    if (!out) fail(tmp, "write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path, "cannot rename the written file into place");
}

}  // namespace lorafleet::native
