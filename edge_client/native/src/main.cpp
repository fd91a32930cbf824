// lorafleet-native: a package's ExecuTorch programs on the C++ runtime, no Python.
//
//   lorafleet-native train --package DIR --rank R --batches FILE --out DIR [--adapter DIR] [--steps N]
//                          [--lr X] [--beta1 X] [--beta2 X] [--eps X] [--weight-decay X]
//   lorafleet-native infer --package DIR --rank R --ids 1,2,3 [--adapter DIR] [--logits FILE]
//   lorafleet-native serve --package DIR --rank R [optimizer flags]     (the Python backend's step protocol)
//   lorafleet-native info  --package DIR --rank R
//
// Every failure is one line on stderr and exit status 2 (usage) or 1.
#include <sys/resource.h>

#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lorafleet_native/batches.h"
#ifdef LORAFLEET_NATIVE_FLEET
#include "lorafleet_native/fleet.h"
#endif
#include "lorafleet_native/trainer.h"

using namespace lorafleet::native;
using json = nlohmann::json;

namespace {

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: lorafleet-native {train|infer|serve|info} --package DIR --rank R [options]\n"
    "  train  --batches FILE --out DIR [--adapter DIR] [--steps N] [--lr X] [--beta1 X] [--beta2 X] [--eps X]\n"
    "         [--weight-decay X]   train the rank's LoRA adapter and write it as PEFT safetensors\n"
    "  infer  --ids 1,2,3 [--adapter DIR] [--logits FILE]   next-token logits of a prompt's ids\n"
    "  serve  [optimizer flags]   steps over stdin/stdout (docs/devices.md)\n"
    "  join   --server HOST:PORT --batches FILE [--root-certificates CA] [--auth-key KEY] [--num-examples N]\n"
    "         [--exit-on-finish] [--max-wait S]   a device of a `lorafleet serve` federation (Flower's Fleet API)\n"
    "  info   the programs' compiled LoRA, batch shape and memory\n";

struct Args {
  std::string command;
  std::map<std::string, std::string> opts;

  Args(int argc, char** argv, const std::vector<std::string>& allowed, const std::vector<std::string>& flags = {}) {
    if (argc < 2) throw Usage("no command");
    command = argv[1];
    for (int i = 2; i < argc; ++i) {
      std::string k = argv[i];
      if (k.rfind("--", 0) != 0) throw Usage("unexpected argument " + k);
      k = k.substr(2);
      if (std::find(flags.begin(), flags.end(), k) != flags.end()) {
        opts[k] = "1";
        continue;
      }
      bool ok = false;
      for (const auto& a : allowed) ok = ok || a == k;
      if (!ok) throw Usage("unknown option --" + k + " for " + command);
      if (i + 1 >= argc) throw Usage("--" + k + " needs a value");
      opts[k] = argv[++i];
    }
  }
  bool has(const std::string& k) const { return opts.count(k) != 0; }
  std::string str(const std::string& k) const {
    auto it = opts.find(k);
    if (it == opts.end()) throw Usage("missing --" + k);
    return it->second;
  }
  long long integer(const std::string& k, long long lo) const {
    const std::string s = str(k);
    size_t pos = 0;
    long long v;
    try {
      v = std::stoll(s, &pos);
    } catch (const std::exception&) {
      throw Usage("--" + k + " must be an integer, got " + s);
    }
    if (pos != s.size() || v < lo) throw Usage("--" + k + " must be an integer >= " + std::to_string(lo) + ", got " + s);
    return v;
  }
  double number(const std::string& k, double fallback) const {
    if (!has(k)) return fallback;
    const std::string s = str(k);
    size_t pos = 0;
    double v;
    try {
      v = std::stod(s, &pos);
    } catch (const std::exception&) {
      throw Usage("--" + k + " must be a number, got " + s);
    }
    if (pos != s.size() || !std::isfinite(v)) throw Usage("--" + k + " must be a finite number, got " + s);
    return v;
  }
};

// A size line of /proc/self/status in bytes (Linux), or 0.
uint64_t status_bytes(const std::string& key) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind(key + ":", 0) == 0) return std::stoull(line.substr(key.size() + 1)) * 1024;
  return 0;
}

// This process's peak resident memory: VmHWM (Linux; it starts afresh at exec, unlike getrusage's ru_maxrss,
// which keeps the forking parent's), else ru_maxrss.
uint64_t peak_rss_bytes() {
  if (const uint64_t hwm = status_bytes("VmHWM")) return hwm;
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
#ifdef __APPLE__
  return static_cast<uint64_t>(usage.ru_maxrss);
#else
  return static_cast<uint64_t>(usage.ru_maxrss) * 1024;
#endif
}

AdamWConfig optimizer(const Args& a) {
  AdamWConfig c;
  c.lr = a.number("lr", c.lr);
  c.beta1 = a.number("beta1", c.beta1);
  c.beta2 = a.number("beta2", c.beta2);
  c.eps = a.number("eps", c.eps);
  c.weight_decay = a.number("weight-decay", c.weight_decay);
  return c;
}

const std::vector<std::string> kOptimizerFlags = {"lr", "beta1", "beta2", "eps", "weight-decay"};

std::vector<std::string> with(std::vector<std::string> base, const std::vector<std::string>& more) {
  base.insert(base.end(), more.begin(), more.end());
  return base;
}

json describe(const Trainer& t) {
  return {{"rank", t.lora().r}, {"lora_alpha", t.lora().lora_alpha}, {"use_rslora", t.lora().use_rslora},
          {"batch_size", t.batch_size()}, {"seq_len", t.seq_len()}, {"factors", t.lora().names.size()},
          {"target_modules", t.lora().target_modules},
          {"planned_bytes", t.planned_bytes()}, {"foundation_bytes", t.foundation_bytes()}};
}

int train(int argc, char** argv) {
  Args a(argc, argv, with({"package", "rank", "batches", "out", "adapter", "steps"}, kOptimizerFlags));
  const int rank = static_cast<int>(a.integer("rank", 1));
  const std::string out = a.str("out");
  if (std::filesystem::exists(out) && !(std::filesystem::is_directory(out) && std::filesystem::is_empty(out)))
    throw std::runtime_error(out + " already exists and is not empty (nothing written)");
  Batches batches = read_batches(a.str("batches"));
  const long long steps = a.has("steps") ? a.integer("steps", 1) : static_cast<long long>(batches.count());
  Paths paths = Paths::training(a.str("package"), rank);
  Trainer trainer(paths, optimizer(a));
  if (batches.batch_size != trainer.batch_size() || batches.seq_len != trainer.seq_len())
    throw std::runtime_error("batches are " + std::to_string(batches.batch_size) + " x " +
                             std::to_string(batches.seq_len) + ", the program trains " +
                             std::to_string(trainer.batch_size()) + " x " + std::to_string(trainer.seq_len()));
  trainer.load_adapter(read_adapter(a.has("adapter") ? a.str("adapter") : paths.initial_adapter));
  for (long long i = 0; i < steps; ++i) {
    const uint64_t b = static_cast<uint64_t>(i) % batches.count();  // several epochs when steps > batches
    const auto start = std::chrono::steady_clock::now();
    const float loss = trainer.step(batches.ids(b), batches.labels_of(b));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!std::isfinite(loss)) throw std::runtime_error("step " + std::to_string(i + 1) + ": the loss is not finite");
    char line[128];
    std::snprintf(line, sizeof line, "{\"step\": %lld, \"loss\": %.9g, \"seconds\": %.6f}", i + 1,
                  static_cast<double>(loss), seconds);
    std::cout << line << "\n" << std::flush;
  }
  write_adapter(trainer.adapter(), out);
  json done = describe(trainer);
  done["written"] = out;
  done["peak_rss_bytes"] = peak_rss_bytes();
  std::cout << done.dump() << "\n";
  return 0;
}

int infer(int argc, char** argv) {
  Args a(argc, argv, {"package", "rank", "ids", "adapter", "logits"});
  std::vector<int64_t> ids;
  std::stringstream ss(a.str("ids"));
  for (std::string tok; std::getline(ss, tok, ',');) {
    size_t pos = 0;
    long long v = -1;
    try {
      v = std::stoll(tok, &pos);
    } catch (const std::exception&) {
    }
    if (pos != tok.size() || v < 0) throw Usage("--ids must be comma-separated token ids, got " + a.str("ids"));
    ids.push_back(v);
  }
  Paths paths = Paths::inference(a.str("package"), static_cast<int>(a.integer("rank", 1)));
  Inference inf(paths);
  if (a.has("adapter")) inf.load_adapter(read_adapter(a.str("adapter")));
  std::vector<float> logits = inf.next_token_logits(ids);
  size_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = i;
  if (a.has("logits")) {
    std::ofstream f(a.str("logits"), std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(logits.data()), static_cast<std::streamsize>(logits.size() * 4));
    if (!f) throw std::runtime_error(a.str("logits") + ": write failed");
  }
  std::cout << json({{"next_token", best}, {"vocab", logits.size()}, {"logit", logits[best]}}).dump() << "\n";
  return 0;
}

int info(int argc, char** argv) {
  Args a(argc, argv, {"package", "rank"});
  Trainer trainer(Paths::training(a.str("package"), static_cast<int>(a.integer("rank", 1))), AdamWConfig{});
  json out = describe(trainer);
  // resident memory once the program is loaded (and has run once): anonymous (allocated, or repacked by a
  // delegate) against file-backed (the mapped foundation's pages)
  out["rss_anon_bytes"] = status_bytes("RssAnon");
  out["rss_file_bytes"] = status_bytes("RssFile");
  std::cout << out.dump() << "\n";
  return 0;
}

// One request per line on stdin, one reply line on stdout:
//   step\n + input_ids and labels as int64 little-endian (B*T each)  ->  loss <float>
//   load <reset 0|1> <adapter dir>                                    ->  ok
//   save <new dir>                                                    ->  ok
//   quit                                                              ->  (exit 0)
// A request that fails answers "error <reason>" and the session goes on.
int serve(int argc, char** argv) {
  Args a(argc, argv, with({"package", "rank"}, kOptimizerFlags));
  Trainer trainer(Paths::training(a.str("package"), static_cast<int>(a.integer("rank", 1))), optimizer(a));
  const size_t n = static_cast<size_t>(trainer.batch_size() * trainer.seq_len());
  std::vector<int64_t> ids(n), labels(n);
  std::cout << "ready " << describe(trainer).dump() << "\n" << std::flush;
  for (std::string line; std::getline(std::cin, line);) {
    try {
      if (line == "quit") return 0;
      if (line == "step") {
        std::cin.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(n * 8));
        std::cin.read(reinterpret_cast<char*>(labels.data()), static_cast<std::streamsize>(n * 8));
        if (!std::cin) throw std::runtime_error("a step request ended before its tokens");
        char reply[64];
        std::snprintf(reply, sizeof reply, "loss %.9g", static_cast<double>(trainer.step(ids.data(), labels.data())));
        std::cout << reply << "\n";
      } else if (line.rfind("load ", 0) == 0 && line.size() > 7 && (line[5] == '0' || line[5] == '1') &&
                 line[6] == ' ') {
        trainer.load_adapter(read_adapter(line.substr(7)), line[5] == '1');
        std::cout << "ok\n";
      } else if (line.rfind("save ", 0) == 0 && line.size() > 5) {
        write_adapter(trainer.adapter(), line.substr(5));
        std::cout << "ok\n";
      } else {
        throw std::runtime_error("unknown request: " + line.substr(0, 40));
      }
    } catch (const std::exception& e) {
      std::string why = e.what();
      for (char& c : why)
        if (c == '\n') c = ' ';
      std::cout << "error " << why << "\n";
      if (!std::cin) return 1;
    }
    std::cout << std::flush;
  }
  return 0;
}

}  // namespace

int join(int argc, char** argv) {
  Args a(argc, argv, {"package", "rank", "server", "batches", "root-certificates", "auth-key", "num-examples",
                      "poll", "max-wait"},
         {"exit-on-finish"});
#ifdef LORAFLEET_NATIVE_FLEET
  FleetConfig c;
  c.server = a.str("server");
  c.package = a.str("package");
  c.rank = static_cast<int>(a.integer("rank", 1));
  c.batches = a.str("batches");
  if (a.has("root-certificates")) c.root_certificates = a.str("root-certificates");
  if (a.has("auth-key")) c.auth_key = a.str("auth-key");
  if (a.has("num-examples")) c.num_examples = a.integer("num-examples", 1);
  c.poll_seconds = a.number("poll", c.poll_seconds);
  c.max_wait_seconds = a.number("max-wait", 0);
  c.exit_on_finish = a.has("exit-on-finish");
  if (c.poll_seconds <= 0 || c.max_wait_seconds < 0) throw Usage("--poll must be positive and --max-wait >= 0");
  return run_fleet_node(c);
#else
  throw std::runtime_error("this build has no Fleet API client: rebuild with libcurl, OpenSSL and protobuf "
                           "development files and protoc present (docs/devices.md)");
#endif
}

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "train") return train(argc, argv);
    if (cmd == "infer") return infer(argc, argv);
    if (cmd == "serve") return serve(argc, argv);
    if (cmd == "info") return info(argc, argv);
    if (cmd == "join") return join(argc, argv);
    if (cmd == "-h" || cmd == "--help") {
      std::cout << kUsage;
      return 0;
    }
    throw Usage(cmd.empty() ? "no command" : "unknown command " + cmd);
  } catch (const Usage& e) {
    std::cerr << "lorafleet-native: " << e.what() << " (lorafleet-native --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::string why = e.what();
    for (char& c : why)
      if (c == '\n') c = ' ';
    std::cerr << "lorafleet-native: error: " << why << "\n";
    return 1;
  }
}
