#include "lorafleet_native/trainer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string_view>

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/flat_tensor/flat_tensor_data_map.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/method_meta.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>
#include <nlohmann/json.hpp>

namespace lorafleet::native {
namespace fs = std::filesystem;
using json = nlohmann::json;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::FlatTensorDataMap;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Span;

namespace {

constexpr const char* kLoraMethod = "lorafleet_lora";  // lorafleet.export.formats.program.LORA_METHOD
constexpr const char* kWrapped = "model.";             // ...program.WRAPPED: the PEFT model inside the wrapper
constexpr const char* kPeftPrefix = "base_model.model.";
constexpr size_t kAlignment = 64;

[[noreturn]] void fail(const std::string& why) { throw std::runtime_error(why); }

void check(Error err, const std::string& what) {
  if (err != Error::Ok) fail(what + " failed (ExecuTorch error " + std::to_string(static_cast<int>(err)) + ")");
}

template <typename T>
T take(executorch::runtime::Result<T>&& r, const std::string& what) {
  if (!r.ok()) fail(what + " failed (ExecuTorch error " + std::to_string(static_cast<int>(r.error())) + ")");
  return std::move(r.get());
}

struct Aligned {
  void* ptr = nullptr;
  size_t size = 0;
  explicit Aligned(size_t n) : size(n) {
    ptr = std::aligned_alloc(kAlignment, std::max<size_t>(kAlignment, (n + kAlignment - 1) / kAlignment * kAlignment));
    if (!ptr) fail("cannot allocate " + std::to_string(n) + " bytes of planned memory");
    std::memset(ptr, 0, n);
  }
  ~Aligned() { std::free(ptr); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

// A tensor argument with its own sizes/strides storage (TensorImpl keeps pointers to them).
struct TensorArg {
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> dim_order;
  std::vector<TensorImpl::StridesType> strides;
  std::unique_ptr<TensorImpl> impl;
  TensorArg(ScalarType type, std::vector<TensorImpl::SizesType> s, void* data) : sizes(std::move(s)) {
    const size_t dim = sizes.size();
    dim_order.resize(dim);
    strides.resize(dim);
    for (size_t i = 0; i < dim; ++i) dim_order[i] = static_cast<TensorImpl::DimOrderType>(i);
    TensorImpl::StridesType stride = 1;
    for (size_t i = dim; i-- > 0;) {
      strides[i] = stride;
      stride *= sizes[i];
    }
    impl = std::make_unique<TensorImpl>(type, static_cast<ssize_t>(dim), sizes.data(), data, dim_order.data(),
                                        strides.data());
  }
  EValue value() const { return EValue(Tensor(impl.get())); }
};

int64_t numel(const Tensor& t) { return static_cast<int64_t>(t.numel()); }

std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (auto d : t.sizes()) s.push_back(d);
  return s;
}

std::string strip_wrapper(std::string_view fqn) {
  std::string s(fqn);
  return s.rfind(kWrapped, 0) == 0 ? s.substr(std::strlen(kWrapped)) : s;
}

double scaling_for(int r, double alpha, bool rslora) { return rslora ? alpha / std::sqrt(double(r)) : alpha / r; }

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail(p.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The runtime's log: its errors on stderr as "executorch: ..."; its info and debug lines (CPU probing at
// start-up) only with LORAFLEET_NATIVE_LOG=1. An app registers its own (logcat, os_log): docs/devices.md.
void emit_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t, const char* message,
              size_t length) {
  static const bool verbose = std::getenv("LORAFLEET_NATIVE_LOG") != nullptr;
  if (verbose || level == kError || level == kFatal) {
    std::fprintf(stderr, "executorch: %.*s\n", static_cast<int>(length), message);
  }
}

void init_runtime() {
  static const bool done = [] {
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
    executorch::runtime::runtime_init();
    return true;
  }();
  (void)done;
}

// The executorch program with its loaders; methods share planned arenas when `share` (programs exported with
// share_mutable_buffers, whose methods read and write the same LoRA state).
class LoadedProgram {
 public:
  LoadedProgram(const std::string& pte, const std::string& ptd, bool share) : share_(share) {
    init_runtime();
    for (const auto& p : {pte, ptd})
      if (!p.empty() && !fs::is_regular_file(p)) fail("ExecuTorch file not found: " + p);
    pte_loader_ = std::make_unique<MmapDataLoader>(
        take(MmapDataLoader::from(pte.c_str(), MmapDataLoader::MlockConfig::NoMlock), "mapping " + pte));
    program_ = std::make_unique<Program>(take(Program::load(pte_loader_.get()), "loading the program " + pte));
    if (!ptd.empty()) {
      ptd_loader_ = std::make_unique<MmapDataLoader>(
          take(MmapDataLoader::from(ptd.c_str(), MmapDataLoader::MlockConfig::NoMlock), "mapping " + ptd));
      data_map_ = std::make_unique<FlatTensorDataMap>(take(FlatTensorDataMap::load(ptd_loader_.get()),
                                                           "reading the foundation " + ptd));
      foundation_bytes_ = fs::file_size(ptd);
    }
    origin_ = pte;
  }

  bool has_method(const std::string& name) const {
    for (size_t i = 0; i < program_->num_methods(); ++i) {
      auto n = program_->get_method_name(i);
      if (n.ok() && name == n.get()) return true;
    }
    return false;
  }

  MethodMeta meta(const std::string& name) const {
    return take(program_->method_meta(name.c_str()), origin_ + ": method " + name);
  }

  // Loads methods (all at once when they share arenas: the arenas are sized to the largest).
  void load(const std::vector<std::string>& names) {
    std::vector<size_t> sizes;
    std::map<std::string, std::vector<size_t>> own;
    for (const auto& n : names) {
      if (!has_method(n)) fail(origin_ + " has no method " + n);
      MethodMeta m = meta(n);
      for (size_t i = 0; i < m.num_memory_planned_buffers(); ++i) {
        const auto s = static_cast<size_t>(take(m.memory_planned_buffer_size(i), "planned buffer size"));
        own[n].push_back(s);
        if (sizes.size() <= i) sizes.push_back(0);
        sizes[i] = std::max(sizes[i], s);
      }
    }
    if (share_)
      for (size_t s : sizes) {
        shared_.push_back(std::make_unique<Aligned>(s));
        planned_bytes_ += s;
      }
    for (const auto& n : names) {
      auto h = std::make_unique<Holder>();
      for (size_t i = 0; i < own[n].size(); ++i) {
        if (share_) {
          h->spans.emplace_back(static_cast<uint8_t*>(shared_[i]->ptr), own[n][i]);
        } else {
          h->buffers.push_back(std::make_unique<Aligned>(own[n][i]));
          planned_bytes_ += own[n][i];
          h->spans.emplace_back(static_cast<uint8_t*>(h->buffers.back()->ptr), own[n][i]);
        }
      }
      h->planned = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(h->spans.data(), h->spans.size()));
      h->memory = std::make_unique<MemoryManager>(&h->method_alloc, h->planned.get(), &h->temp_alloc);
      h->method = std::make_unique<Method>(
          take(program_->load_method(n.c_str(), h->memory.get(), nullptr, data_map_.get()), origin_ + ": loading " + n));
      methods_[n] = std::move(h);
    }
  }

  Method& method(const std::string& name) {
    auto it = methods_.find(name);
    if (it == methods_.end()) fail(origin_ + ": method " + name + " not loaded");
    return *it->second->method;
  }

  // Runs a method with no inputs (the constant metadata methods) and returns its outputs.
  std::vector<EValue> run_constant(const std::string& name) {
    if (!methods_.count(name)) load({name});
    Method& m = method(name);
    check(m.execute(), origin_ + ": " + name);
    std::vector<EValue> out;
    for (size_t i = 0; i < m.outputs_size(); ++i) out.push_back(m.get_output(i));
    return out;
  }

  CompiledLora compiled_lora() {
    auto out = run_constant(kLoraMethod);
    if (out.size() != 1 || !out[0].isString()) fail(origin_ + ": " + kLoraMethod + " did not return a string");
    auto sv = out[0].toString();
    json j = json::parse(std::string(sv.data(), sv.size()), nullptr, false);
    if (j.is_discarded() || !j.is_object()) fail(origin_ + ": " + kLoraMethod + " is not JSON");
    CompiledLora c;
    try {
      c.r = j.at("r").get<int>();
      c.lora_alpha = j.at("lora_alpha").get<double>();
      c.use_rslora = j.value("use_rslora", false);
      c.names = j.at("names").get<std::vector<std::string>>();
      c.target_modules = j.at("target_modules").get<std::vector<std::string>>();
    } catch (const json::exception& e) {
      fail(origin_ + ": " + kLoraMethod + ": " + e.what());
    }
    if (c.r <= 0) fail(origin_ + ": compiled rank is not positive");
    return c;
  }

  const std::string& origin() const { return origin_; }
  uint64_t planned_bytes() const { return planned_bytes_; }
  uint64_t foundation_bytes() const { return foundation_bytes_; }

 private:
  struct Holder {
    MallocMemoryAllocator method_alloc, temp_alloc;
    std::vector<std::unique_ptr<Aligned>> buffers;
    std::vector<Span<uint8_t>> spans;
    std::unique_ptr<HierarchicalAllocator> planned;
    std::unique_ptr<MemoryManager> memory;
    std::unique_ptr<Method> method;
  };
  bool share_;
  std::string origin_;
  std::unique_ptr<MmapDataLoader> pte_loader_, ptd_loader_;
  std::unique_ptr<Program> program_;
  std::unique_ptr<FlatTensorDataMap> data_map_;
  std::vector<std::unique_ptr<Aligned>> shared_;
  std::map<std::string, std::unique_ptr<Holder>> methods_;
  uint64_t planned_bytes_ = 0, foundation_bytes_ = 0;
};

std::vector<TensorImpl::SizesType> input_sizes(const MethodMeta& m, size_t i, ScalarType want, const std::string& what) {
  auto info = take(m.input_tensor_meta(i), what + " input " + std::to_string(i));
  if (info.scalar_type() != want) fail(what + ": input " + std::to_string(i) + " has an unexpected dtype");
  std::vector<TensorImpl::SizesType> s(info.sizes().begin(), info.sizes().end());
  return s;
}

// The adapter's tensors in the program's order, rescaled to the program's scaling, checked against it.
std::vector<FloatTensor> factors_in_order(const Adapter& adapter, const CompiledLora& lora,
                                          const std::vector<std::vector<int64_t>>& shapes) {
  json cfg = json::parse(adapter.config_json, nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object()) fail("adapter_config.json is not a JSON object");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (cfg.contains(k) && !cfg[k].is_null() && !cfg[k].empty())
      fail(std::string("adapter_config.json has a ") + k + " (per-module ranks or alphas): rescale it with "
           "lorafleet first (lorafleet.export.formats.adapter.rescale)");
  const double alpha = cfg.contains("lora_alpha") && cfg["lora_alpha"].is_number() ? cfg["lora_alpha"].get<double>()
                                                                                    : 8.0;  // PEFT's default
  const bool rslora = cfg.value("use_rslora", false);
  std::set<std::string> want, got;
  for (const auto& n : lora.names) want.insert(peft_key(n));
  for (const auto& [k, v] : adapter.tensors) got.insert(k);
  std::vector<std::string> missing, extra;
  std::set_difference(want.begin(), want.end(), got.begin(), got.end(), std::back_inserter(missing));
  std::set_difference(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(extra));
  if (!missing.empty() || !extra.empty())
    fail("adapter modules do not match the program: missing " + std::to_string(missing.size()) +
         (missing.empty() ? "" : " (" + missing[0] + ")") + ", unexpected " + std::to_string(extra.size()) +
         (extra.empty() ? "" : " (" + extra[0] + ")"));
  const double program_scaling = lora.scaling();
  std::vector<FloatTensor> out;
  for (size_t i = 0; i < lora.names.size(); ++i) {
    const std::string key = peft_key(lora.names[i]);
    FloatTensor t = adapter.tensors.at(key);
    if (t.shape != shapes[i]) {
      std::string s = "(";
      for (auto d : t.shape) s += std::to_string(d) + ",";
      fail(key + ": adapter shape " + s + ") does not match the program's (program rank " +
           std::to_string(lora.r) + ")");
    }
    const bool is_b = key.find(".lora_B.") != std::string::npos;
    if (is_b) {
      const int r = static_cast<int>(t.shape.size() == 2 ? t.shape[1] : 0);
      const float ratio = static_cast<float>(scaling_for(r, alpha, rslora) / program_scaling);
      if (ratio != 1.0f)
        for (float& x : t.data) x *= ratio;
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::string output_config(const std::string& base_config, const CompiledLora& lora) {
  json cfg = json::object();
  if (!base_config.empty()) {
    json b = json::parse(base_config, nullptr, false);
    if (b.is_object()) cfg = b;
  }
  cfg["peft_type"] = cfg.value("peft_type", std::string("LORA"));
  cfg["task_type"] = cfg.value("task_type", std::string("CAUSAL_LM"));
  cfg["r"] = lora.r;
  cfg["lora_alpha"] = lora.lora_alpha;
  cfg["use_rslora"] = lora.use_rslora;
  cfg["target_modules"] = lora.target_modules;
  cfg["rank_pattern"] = json::object();
  cfg["alpha_pattern"] = json::object();
  return cfg.dump(2) + "\n";
}

}  // namespace

double CompiledLora::scaling() const { return scaling_for(r, lora_alpha, use_rslora); }

std::string peft_key(const std::string& name) {
  for (const char* which : {".lora_A", ".lora_B"}) {
    const auto pos = name.rfind(which);
    if (pos == std::string::npos) continue;
    const std::string rest = name.substr(pos + std::strlen(which));
    // rest is ".weight" or ".<adapter>.weight"
    if (rest != ".weight" && !(rest.size() > 8 && rest.compare(rest.size() - 7, 7, ".weight") == 0)) continue;
    std::string module = name.substr(0, pos);
    const auto pre = module.find(kPeftPrefix);
    if (pre != std::string::npos) module = module.substr(pre + std::strlen(kPeftPrefix));
    return std::string(kPeftPrefix) + module + which + ".weight";
  }
  fail("not a LoRA parameter name: " + name);
}

Adapter read_adapter(const std::string& path) {
  fs::path dir(path), weights;
  if (fs::is_directory(dir)) {
    weights = dir / "adapter_model.safetensors";
    if (!fs::is_regular_file(weights)) {
      if (fs::exists(dir / "adapter_model.bin"))
        fail(path + " holds a pickled adapter (adapter_model.bin): only safetensors are read");
      fail(path + " has no adapter_model.safetensors");
    }
  } else {
    weights = dir;
    dir = dir.parent_path();
  }
  if (!fs::exists(weights)) fail(path + ": no such adapter directory");
  Adapter a;
  a.tensors = read_safetensors(weights.string());
  const fs::path cfg = dir / "adapter_config.json";
  if (!fs::is_regular_file(cfg)) fail(dir.string() + " has no adapter_config.json");
  a.config_json = read_text(cfg);
  return a;
}

void write_adapter(const Adapter& adapter, const std::string& dir) {
  const fs::path out(dir), tmp(dir + ".partial");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    fail(dir + " already exists and is not empty (nothing written)");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  write_safetensors((tmp / "adapter_model.safetensors").string(), adapter.tensors, {{"format", "pt"}});
  {
    std::ofstream c(tmp / "adapter_config.json", std::ios::trunc);
    c << adapter.config_json;
    if (!c) fail((tmp / "adapter_config.json").string() + ": write failed");
  }
  if (fs::exists(out)) fs::remove(out);
  fs::rename(tmp, out);
}

Paths Paths::training(const std::string& package, int rank) {
  const fs::path p(package);
  const std::string r = "rank-" + std::to_string(rank);
  if (!fs::is_regular_file(p / "manifest.json")) fail(package + " is not a lorafleet package (no manifest.json)");
  if (fs::file_size(p / "manifest.json") > (64u << 20)) fail(package + ": manifest.json is implausibly large");
  const json manifest = json::parse(read_text(p / "manifest.json"), nullptr, false);
  if (!manifest.is_object() || !manifest.contains("model") || !manifest["model"].is_object() ||
      !manifest["model"].contains("vocab_size") || !manifest["model"]["vocab_size"].is_number_unsigned() ||
      manifest["model"]["vocab_size"].get<int64_t>() < 1)
    fail(package + ": manifest.json has no model.vocab_size");
  const fs::path pte = p / "executorch" / r / "training.pte";
  if (!fs::is_regular_file(pte)) fail(package + " has no ExecuTorch training program for rank " + std::to_string(rank));
  const fs::path ptd = p / "executorch" / "foundation.ptd";
  Paths out{pte.string(), fs::is_regular_file(ptd) ? ptd.string() : "", (p / "adapters" / r).string()};
  out.vocab_size = manifest["model"]["vocab_size"].get<int64_t>();
  return out;
}

Paths Paths::inference(const std::string& package, int rank) {
  Paths t = training(package, rank);
  t.program = (fs::path(package) / "executorch" / ("rank-" + std::to_string(rank)) / "inference.pte").string();
  if (!fs::is_regular_file(t.program))
    fail(package + " has no ExecuTorch inference program for rank " + std::to_string(rank));
  return t;
}

// --- training --------------------------------------------------------------------------------------------

struct Trainer::Impl {
  LoadedProgram program;
  AdamWConfig opt;
  CompiledLora lora;
  std::vector<TensorImpl::SizesType> ids_sizes;
  int64_t grads_at = 0, params_at = 0;
  std::vector<std::string> order;                // parameter names (no wrapper), output order
  std::vector<float*> params;                    // alias the program's parameter memory
  std::vector<std::vector<int64_t>> shapes;      // in `lora.names` order
  std::vector<size_t> slot;                      // lora.names[i] -> index in `order`
  std::vector<std::vector<float>> m, v;
  int64_t t = 0;
  std::string base_config;  // the loaded adapter's adapter_config.json: the written one keeps its other fields

  int64_t vocab = 0;

  Impl(const Paths& paths, const AdamWConfig& o)
      : program(paths.program, paths.foundation, false), opt(o), vocab(paths.vocab_size) {
    lora = program.compiled_lora();
    auto gi = program.run_constant("__et_training_gradients_index_forward");
    auto pi = program.run_constant("__et_training_parameters_index_forward");
    auto fq = program.run_constant("__et_training_fqn_forward");
    if (gi.size() != 1 || !gi[0].isInt() || pi.size() != 1 || !pi[0].isInt())
      fail(program.origin() + " is not an ExecuTorch training program (no gradient/parameter indices)");
    grads_at = gi[0].toInt();
    params_at = pi[0].toInt();
    for (auto& e : fq) {
      if (!e.isString()) fail(program.origin() + ": parameter names are not strings");
      auto sv = e.toString();
      order.push_back(strip_wrapper(std::string_view(sv.data(), sv.size())));
    }
    program.load({"forward"});
    MethodMeta meta = program.meta("forward");
    if (meta.num_inputs() != 2) fail(program.origin() + ": forward does not take (input_ids, labels)");
    ids_sizes = input_sizes(meta, 0, ScalarType::Long, program.origin());
    if (input_sizes(meta, 1, ScalarType::Long, program.origin()) != ids_sizes || ids_sizes.size() != 2)
      fail(program.origin() + ": input_ids and labels differ in shape");
    if (static_cast<int64_t>(meta.num_outputs()) != params_at + static_cast<int64_t>(order.size()) ||
        params_at - grads_at != static_cast<int64_t>(order.size()))
      fail(program.origin() + ": outputs do not hold one gradient and one parameter per LoRA factor");
    // ExecuTorch hands out the parameter tensors as outputs of forward: run it once on a dummy batch.
    std::vector<int64_t> zeros(static_cast<size_t>(ids_sizes[0] * ids_sizes[1]), 0);
    execute(zeros.data(), zeros.data());
    Method& f = program.method("forward");
    std::map<std::string, size_t> where;
    for (size_t i = 0; i < order.size(); ++i) {
      const Tensor p = f.get_output(static_cast<size_t>(params_at) + i).toTensor();
      if (p.scalar_type() != ScalarType::Float) fail(program.origin() + ": a LoRA parameter is not float32");
      params.push_back(p.mutable_data_ptr<float>());
      m.emplace_back(static_cast<size_t>(numel(p)), 0.0f);
      v.emplace_back(static_cast<size_t>(numel(p)), 0.0f);
      where[order[i]] = i;
    }
    for (const auto& n : lora.names) {
      auto it = where.find(n);
      if (it == where.end()) fail(program.origin() + ": compiled LoRA name " + n + " is not a parameter");
      slot.push_back(it->second);
      shapes.push_back(shape_of(f.get_output(static_cast<size_t>(params_at) + it->second).toTensor()));
    }
    if (where.size() != lora.names.size()) fail(program.origin() + ": parameters other than the LoRA factors");
  }

  void execute(const int64_t* ids, const int64_t* labels) {
    Method& f = program.method("forward");
    TensorArg a(ScalarType::Long, ids_sizes, const_cast<int64_t*>(ids));
    TensorArg b(ScalarType::Long, ids_sizes, const_cast<int64_t*>(labels));
    check(f.set_input(a.value(), 0), "setting input_ids");
    check(f.set_input(b.value(), 1), "setting labels");
    check(f.execute(), program.origin() + ": forward");
  }
};

Trainer::Trainer(const Paths& paths, const AdamWConfig& optimizer) : impl_(std::make_unique<Impl>(paths, optimizer)) {
  set_optimizer(optimizer);
}
Trainer::~Trainer() = default;

static void check_tokens(const int64_t* ids, const int64_t* labels, int64_t n, int64_t vocab) {
  if (vocab <= 0) return;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      fail("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
           " is outside the vocabulary (" + std::to_string(vocab) + ")");
    if (labels && labels[i] != -100 && (labels[i] < 0 || labels[i] >= vocab))
      fail("label " + std::to_string(labels[i]) + " at position " + std::to_string(i) +
           " is neither -100 nor a token id below " + std::to_string(vocab));
  }
}

float Trainer::step(const int64_t* input_ids, const int64_t* labels) {
  Impl& s = *impl_;
  check_tokens(input_ids, labels, s.ids_sizes[0] * s.ids_sizes[1], s.vocab);
  s.execute(input_ids, labels);
  Method& f = s.program.method("forward");
  const float loss = f.get_output(0).toTensor().const_data_ptr<float>()[0];
  // AdamW in float32, operation for operation and rounding for rounding as
  // lorafleet.edge_client.backends.base.AdamW runs it in torch on the CPU.
  s.t += 1;
  const AdamWConfig& c = s.opt;
  const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
  const float one_b1 = static_cast<float>(1.0 - c.beta1), one_b2 = static_cast<float>(1.0 - c.beta2);
  const float lr_t = static_cast<float>(c.lr * std::sqrt(1.0 - std::pow(c.beta2, double(s.t))) /
                                        (1.0 - std::pow(c.beta1, double(s.t))));
  const float eps = static_cast<float>(c.eps), decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
  for (size_t i = 0; i < s.params.size(); ++i) {
    const Tensor g = f.get_output(static_cast<size_t>(s.grads_at) + i).toTensor();
    const float* gp = g.const_data_ptr<float>();
    float* p = s.params[i];
    float* m = s.m[i].data();
    float* v = s.v[i].data();
    for (size_t j = 0, n = s.m[i].size(); j < n; ++j) {
      // The roundings of ATen's CPU kernels (matched against torch's in-place ops on x86-64): add_(g, alpha)
      // is one fused multiply-add (vec::fmadd(g, alpha, m)); addcmul_ rounds value·g, then fuses ·g + v;
      // addcdiv_ computes (value·m) / denominator, then adds.
      m[j] = std::fma(gp[j], one_b1, m[j] * b1);
      v[j] = std::fma(one_b2 * gp[j], gp[j], v[j] * b2);
      p[j] = p[j] + ((-lr_t) * m[j]) / (std::sqrt(v[j]) + eps);
      if (c.weight_decay != 0) p[j] = p[j] * decay;
    }
  }
  return loss;
}

void Trainer::load_adapter(const Adapter& adapter, bool reset) {
  Impl& s = *impl_;
  auto factors = factors_in_order(adapter, s.lora, s.shapes);
  for (size_t i = 0; i < factors.size(); ++i)
    std::memcpy(s.params[s.slot[i]], factors[i].data.data(), factors[i].data.size() * sizeof(float));
  s.base_config = adapter.config_json;
  if (reset) reset_optimizer();
}

Adapter Trainer::adapter() const {
  const Impl& s = *impl_;
  Adapter a;
  for (size_t i = 0; i < s.lora.names.size(); ++i) {
    FloatTensor t;
    t.shape = s.shapes[i];
    const float* p = s.params[s.slot[i]];
    t.data.assign(p, p + t.numel());
    a.tensors.emplace(peft_key(s.lora.names[i]), std::move(t));
  }
  a.config_json = output_config(s.base_config, s.lora);
  return a;
}

void Trainer::set_optimizer(const AdamWConfig& o) {
  if (o.lr <= 0 || !std::isfinite(o.lr)) fail("lr must be a positive number");
  if (!(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1)) fail("betas must lie in [0, 1)");
  if (!(o.eps > 0 && o.weight_decay >= 0)) fail("eps must be positive and weight_decay non-negative");
  impl_->opt = o;
}

void Trainer::reset_optimizer() {
  for (auto& b : impl_->m) std::fill(b.begin(), b.end(), 0.0f);
  for (auto& b : impl_->v) std::fill(b.begin(), b.end(), 0.0f);
  impl_->t = 0;
}

const CompiledLora& Trainer::lora() const { return impl_->lora; }
int64_t Trainer::batch_size() const { return impl_->ids_sizes[0]; }
int64_t Trainer::seq_len() const { return impl_->ids_sizes[1]; }
uint64_t Trainer::planned_bytes() const { return impl_->program.planned_bytes(); }
uint64_t Trainer::foundation_bytes() const { return impl_->program.foundation_bytes(); }

// --- inference -------------------------------------------------------------------------------------------

struct Inference::Impl {
  LoadedProgram program;
  CompiledLora lora;
  std::vector<TensorImpl::SizesType> ids_sizes;
  std::vector<std::vector<int64_t>> shapes;

  int64_t vocab = 0;

  explicit Impl(const Paths& paths) : program(paths.program, paths.foundation, true), vocab(paths.vocab_size) {
    lora = program.compiled_lora();
    // Every method at once: they share the LoRA state (share_mutable_buffers), initialized when loaded.
    program.load({"forward", "set_lora", "get_lora"});
    ids_sizes = input_sizes(program.meta("forward"), 0, ScalarType::Long, program.origin());
    if (ids_sizes.size() != 2 || ids_sizes[0] != 1) fail(program.origin() + ": forward does not take (1, T) ids");
    MethodMeta set = program.meta("set_lora");
    if (set.num_inputs() != lora.names.size()) fail(program.origin() + ": set_lora does not take every factor");
    for (size_t i = 0; i < set.num_inputs(); ++i) {
      auto s = input_sizes(set, i, ScalarType::Float, program.origin());
      shapes.emplace_back(s.begin(), s.end());
    }
  }
};

Inference::Inference(const Paths& paths) : impl_(std::make_unique<Impl>(paths)) {}
Inference::~Inference() = default;

void Inference::load_adapter(const Adapter& adapter) {
  Impl& s = *impl_;
  auto factors = factors_in_order(adapter, s.lora, s.shapes);
  std::vector<std::unique_ptr<TensorArg>> args;
  Method& set = s.program.method("set_lora");
  for (size_t i = 0; i < factors.size(); ++i) {
    std::vector<TensorImpl::SizesType> sz(factors[i].shape.begin(), factors[i].shape.end());
    args.push_back(std::make_unique<TensorArg>(ScalarType::Float, sz, factors[i].data.data()));
    check(set.set_input(args.back()->value(), i), "setting a LoRA factor");
  }
  check(set.execute(), s.program.origin() + ": set_lora");
}

std::vector<float> Inference::next_token_logits(const std::vector<int64_t>& ids, int64_t pad) {
  Impl& s = *impl_;
  const int64_t T = s.ids_sizes[1];
  if (ids.empty() || static_cast<int64_t>(ids.size()) > T)
    fail("a prompt of " + std::to_string(ids.size()) + " ids does not fit the program's window of " +
         std::to_string(T));
  std::vector<int64_t> window(static_cast<size_t>(T), pad);
  std::copy(ids.begin(), ids.end(), window.begin());
  check_tokens(window.data(), nullptr, T, s.vocab);
  Method& f = s.program.method("forward");
  TensorArg a(ScalarType::Long, s.ids_sizes, window.data());
  check(f.set_input(a.value(), 0), "setting input_ids");
  check(f.execute(), s.program.origin() + ": forward");
  const Tensor logits = f.get_output(0).toTensor();
  if (logits.dim() != 3 || logits.size(1) != T) fail(s.program.origin() + ": logits are not (1, T, vocab)");
  const int64_t vocab = logits.size(2);
  const float* row = logits.const_data_ptr<float>() + (static_cast<int64_t>(ids.size()) - 1) * vocab;
  return std::vector<float>(row, row + vocab);
}

const CompiledLora& Inference::lora() const { return impl_->lora; }
int64_t Inference::seq_len() const { return impl_->ids_sizes[1]; }

}  // namespace lorafleet::native
