// Token batches as the Python side writes them (lorafleet.edge_client.backends.native_backend.write_batches);
// on a phone the app's own tokenizer writes the same layout. All integers little-endian:
//
//   offset  size  field
//   0       4     magic "LFTB"
//   4       4     uint32 version (1)
//   8       4     uint32 batch size B
//   12      4     uint32 sequence length T
//   16      8     uint64 number of batches N
//   24      ...   N records, each int64 input_ids[B*T] then int64 labels[B*T] (-100: not scored)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lorafleet::native {

struct Batches {
  uint32_t batch_size = 0, seq_len = 0;
  std::vector<int64_t> input_ids, labels;  // N * B * T each
  uint64_t count() const;
  const int64_t* ids(uint64_t i) const;
  const int64_t* labels_of(uint64_t i) const;
};

Batches read_batches(const std::string& path);

}  // namespace lorafleet::native
