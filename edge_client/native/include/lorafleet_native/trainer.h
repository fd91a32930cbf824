// A lorafleet package's ExecuTorch programs on the C++ runtime, without Python: the training program
// (executorch/rank-<r>/training.pte) reading the shared frozen weights (executorch/foundation.ptd), the same
// AdamW as the Python backends, PEFT adapters in and out; and the inference program's next-token logits.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lorafleet_native/safetensors.h"

namespace lorafleet::native {

// ONNX Runtime's AdamWOptimizer (adam_mode=1) with ORT's artifact defaults, as
// lorafleet.edge_client.backends.base.AdamW computes it in float32.
struct AdamWConfig {
  double lr = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;
  double weight_decay = 0.0;
};

// The program's compiled LoRA (the `lorafleet_lora` constant method's JSON).
struct CompiledLora {
  int r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  std::vector<std::string> names;            // program parameter names, in program order
  std::vector<std::string> target_modules;
  double scaling() const;
};

// A PEFT adapter: tensors by PEFT key (base_model.model.<module>.lora_A.weight) and its adapter_config.json text.
struct Adapter {
  TensorMap tensors;
  std::string config_json;
};

Adapter read_adapter(const std::string& dir);
// Writes DIR/adapter_model.safetensors and DIR/adapter_config.json into a fresh directory (DIR must not exist,
// or be empty), through DIR.partial and a rename.
void write_adapter(const Adapter& adapter, const std::string& dir);

// PEFT's saved key of a LoRA parameter name ("…q_proj.lora_A.default.weight" -> "base_model.model.…lora_A.weight").
std::string peft_key(const std::string& name);

struct Paths {
  std::string program, foundation, initial_adapter;
  int64_t vocab_size = 0;  // manifest.json's model.vocab_size: token ids and labels are checked against it
  static Paths training(const std::string& package, int rank);
  static Paths inference(const std::string& package, int rank);
};

class Trainer {
 public:
  Trainer(const Paths& paths, const AdamWConfig& optimizer);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Forward, backward and one AdamW step on a batch of `batch_size() * seq_len()` input ids and labels (-100
  // ignored). Returns the loss before the update. Ids outside [0, vocab_size) are refused before the program
  // runs, as are labels that are neither -100 nor such an id.
  float step(const int64_t* input_ids, const int64_t* labels);
  // Loads `adapter` (rescaled to the program's compiled scaling); resets the optimizer unless told not to.
  void load_adapter(const Adapter& adapter, bool reset_optimizer = true);
  Adapter adapter() const;  // the current LoRA weights at the program's scaling
  void reset_optimizer();
  void set_optimizer(const AdamWConfig& optimizer);  // new hyper-parameters (the moments are kept)

  const CompiledLora& lora() const;
  int64_t batch_size() const;
  int64_t seq_len() const;
  uint64_t planned_bytes() const;     // the program's memory-planned buffers
  uint64_t foundation_bytes() const;  // the size of the foundation file it maps

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Inference {
 public:
  explicit Inference(const Paths& paths);
  ~Inference();
  Inference(const Inference&) = delete;
  Inference& operator=(const Inference&) = delete;

  void load_adapter(const Adapter& adapter);
  // Logits of the token after `ids` (1 <= len <= seq_len(); the rest of the window is padded with `pad`).
  std::vector<float> next_token_logits(const std::vector<int64_t>& ids, int64_t pad = 0);
  const CompiledLora& lora() const;
  int64_t seq_len() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorafleet::native
