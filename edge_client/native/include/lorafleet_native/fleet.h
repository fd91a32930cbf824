// A device that joins a lorafleet federation without Python: Flower's Fleet API (protobuf over HTTP(S), as
// docs/federation-protocol.md describes it) with libcurl, OpenSSL and protobuf, answering the rank query and
// the training messages with the native Trainer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lorafleet::native {

struct FleetConfig {
  std::string server;             // HOST:PORT of `lorafleet serve --address` (or an http(s):// URL)
  std::string root_certificates;  // CA file: TLS (https) verified against it; empty: plaintext
  std::string auth_key;           // the node's private key (PEM) registered with the server; empty: a fresh one
  std::string package;            // the edge package directory
  int rank = 0;                   // the answer to the rank query (the largest rank this device can train)
  std::string batches;            // token batches (batches.h) the device trains on
  int64_t num_examples = 0;       // reported as num-examples; 0: batches x batch size
  double poll_seconds = 3.0;      // how often to ask for a message when idle (the Python SuperNode's 3 s)
  double heartbeat_seconds = 30.0;
  bool exit_on_finish = false;    // stop after training the run's last round (config num-rounds)
  double max_wait_seconds = 0;    // give up when the server has been unreachable this long (0: never)
};

// Runs the device until it is told to stop (SIGINT/SIGTERM), or the run is over with exit_on_finish. Returns
// the process exit status; prints one line per event on stdout.
int run_fleet_node(const FleetConfig& config);

// The pieces, exposed for tests and apps. An Array's `data` as NumPy's .npy format 1.0 (float32, C order).
std::string npy_encode_f32(const std::vector<int64_t>& shape, const float* data);
// Throws std::runtime_error unless `npy` is a little-endian float16/32/64 .npy array in C order.
void npy_decode(const std::string& npy, std::vector<int64_t>* shape, std::vector<float>* data);

}  // namespace lorafleet::native
