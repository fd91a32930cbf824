// Flower's Fleet API from C++: what `lorafleet-native join` speaks (docs/federation-protocol.md, docs/devices.md).
//
// Every request is a protobuf message POSTed to /v1/fleet/<call> (content-type application/protobuf), signed
// the way Flower's SuperNode signs it: an ECDSA P-384 key of the node, its public key (PEM, base64) in
// flwr-public-key, the current time (ISO 8601) in flwr-timestamp and the SHA-256 ECDSA signature of that
// timestamp (DER, base64) in flwr-signature. A message's content travels as Flower's inflatable objects, each
// addressed by the SHA-256 of its bytes: "<type> <child ids, comma-separated> <body length>\0<body>".
#include "lorafleet_native/fleet.h"

#include <curl/curl.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <nlohmann/json.hpp>

#include "flwr/proto/fleet.pb.h"
#include "flwr/proto/heartbeat.pb.h"
#include "flwr/proto/message.pb.h"
#include "flwr/proto/recorddict.pb.h"
#include "lorafleet_native/batches.h"
#include "lorafleet_native/trainer.h"

namespace lorafleet::native {
namespace {

using json = nlohmann::json;
namespace fp = flwr::proto;

constexpr int kProtocol = 1;                         // lorafleet.export.formats.protocol.PROTOCOL_VERSION
constexpr size_t kMaxChunk = 5242880;                // Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
constexpr size_t kMaxObjectBytes = 512ull << 20;     // one pulled object (a chunk is 5 MiB)
constexpr size_t kMaxMessageBytes = 4ull << 30;      // all objects of one received message
constexpr size_t kMaxResponseBytes = 600ull << 20;   // one HTTP response body
constexpr int kErrorClientAppRaised = 2;             // Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
constexpr double kFinishGraceSeconds = 60.0;         // lorafleet.federation.node_log.FINISH_GRACE

std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// datetime.now(timezone.utc).isoformat(): 2026-12-04T22:10:00.123456+00:00
std::string iso_now() {
  const auto now = std::chrono::system_clock::now();
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
  const std::time_t secs = static_cast<std::time_t>(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lld+00:00", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(us % 1000000));
  return buf;
}

void say(const std::string& line) { std::cout << "lorafleet-native: " << line << std::endl; }

std::string sha256_hex(const std::string& data) {
  unsigned char d[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), d);
  static const char* hex = "0123456789abcdef";
  std::string out(2 * SHA256_DIGEST_LENGTH, '0');
  for (int i = 0; i < SHA256_DIGEST_LENGTH; ++i) {
    out[2 * i] = hex[d[i] >> 4];
    out[2 * i + 1] = hex[d[i] & 15];
  }
  return out;
}

std::string base64(const std::string& data) {
  std::string out(4 * ((data.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(data.data()), static_cast<int>(data.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

// --- the node's key ----------------------------------------------------------------------------------------

class Identity {
 public:
  explicit Identity(const std::string& key_file) {
    if (key_file.empty()) {
      key_ = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "secp384r1");  // Flower's generate_key_pairs()
      if (!key_) throw std::runtime_error("cannot generate the node's EC key");
    } else {
      FILE* f = std::fopen(key_file.c_str(), "r");
      if (!f) throw std::runtime_error(key_file + ": cannot open the node key");
      key_ = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr);
      std::fclose(f);
      if (!key_) throw std::runtime_error(key_file + ": not a PEM private key");
    }
    BIO* bio = BIO_new(BIO_s_mem());
    if (!PEM_write_bio_PUBKEY(bio, key_)) throw std::runtime_error("cannot write the node's public key");
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio, &data);
    public_pem_.assign(data, static_cast<size_t>(n));
    BIO_free(bio);
  }
  ~Identity() { EVP_PKEY_free(key_); }
  Identity(const Identity&) = delete;
  Identity& operator=(const Identity&) = delete;

  const std::string& public_pem() const { return public_pem_; }

  std::string sign(const std::string& message) const {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    size_t len = 0;
    if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key_) != 1 ||
        EVP_DigestSign(ctx.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(message.data()),
                       message.size()) != 1)
      throw std::runtime_error("signing the request failed");
    std::string sig(len, '\0');
    if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len,
                       reinterpret_cast<const unsigned char*>(message.data()), message.size()) != 1)
      throw std::runtime_error("signing the request failed");
    sig.resize(len);
    return sig;
  }

 private:
  EVP_PKEY* key_ = nullptr;
  std::string public_pem_;
};

// --- HTTP ------------------------------------------------------------------------------------------------

struct HttpError : std::runtime_error {
  long status;
  HttpError(long s, const std::string& what) : std::runtime_error(what), status(s) {}
};

size_t collect(char* ptr, size_t size, size_t n, void* user) {
  auto* out = static_cast<std::string*>(user);
  if (out->size() + size * n > kMaxResponseBytes) return 0;  // aborts the transfer
  out->append(ptr, size * n);
  return size * n;
}

class FleetApi {
 public:
  FleetApi(const FleetConfig& c, const Identity& id) : id_(id), ca_(c.root_certificates) {
    base_ = c.server;
    if (base_.rfind("http://", 0) != 0 && base_.rfind("https://", 0) != 0)
      base_ = (ca_.empty() ? "http://" : "https://") + base_;
    if (base_.rfind("https://", 0) == 0 && ca_.empty())
      throw std::runtime_error("an https server needs --root-certificates (the CA its certificate is checked against)");
    if (base_.rfind("http://", 0) == 0 && !ca_.empty())
      throw std::runtime_error("--root-certificates given for a plaintext http:// server");
    curl_ = curl_easy_init();
    if (!curl_) throw std::runtime_error("libcurl: cannot create a handle");
  }
  ~FleetApi() { curl_easy_cleanup(curl_); }
  FleetApi(const FleetApi&) = delete;
  FleetApi& operator=(const FleetApi&) = delete;

  template <typename Response>
  Response call(const std::string& name, const google::protobuf::Message& request, double timeout = 120) {
    std::string body;
    if (!request.SerializeToString(&body)) throw std::runtime_error(name + ": cannot serialize the request");
    const std::string stamp = iso_now();
    curl_slist* headers = nullptr;
    for (const std::string& h : {std::string("Content-Type: application/protobuf"),
                                 std::string("Accept: application/protobuf"),
                                 "flwr-public-key: " + base64(id_.public_pem()), "flwr-timestamp: " + stamp,
                                 "flwr-signature: " + base64(id_.sign(stamp))})
      headers = curl_slist_append(headers, h.c_str());
    std::string response;
    long status = 0;
    const std::string url = base_ + "/v1/fleet/" + name;
    curl_easy_reset(curl_);
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl_, CURLOPT_POST, 1L);
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &response);
    curl_easy_setopt(curl_, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout * 1000));
    curl_easy_setopt(curl_, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl_, CURLOPT_PROTOCOLS_STR, "http,https");
    if (!ca_.empty()) {
      curl_easy_setopt(curl_, CURLOPT_CAINFO, ca_.c_str());
      curl_easy_setopt(curl_, CURLOPT_SSL_VERIFYPEER, 1L);
      curl_easy_setopt(curl_, CURLOPT_SSL_VERIFYHOST, 2L);
    }
    const CURLcode rc = curl_easy_perform(curl_);
    curl_slist_free_all(headers);
    if (rc != CURLE_OK) throw HttpError(0, name + ": " + curl_easy_strerror(rc));
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) {
      std::string text = response.substr(0, 300);
      std::replace(text.begin(), text.end(), '\n', ' ');
      throw HttpError(status, name + ": HTTP " + std::to_string(status) + " " + text);
    }
    Response out;
    if (!out.ParseFromString(response)) throw std::runtime_error(name + ": the response is not a protobuf message");
    return out;
  }

 private:
  const Identity& id_;
  std::string base_, ca_;
  CURL* curl_ = nullptr;
};

// --- inflatable objects ------------------------------------------------------------------------------------

struct Object {
  std::string type;
  std::vector<std::string> children;
  std::string body;
};

std::string deflate(const std::string& type, const std::vector<std::string>& children, const std::string& body) {
  std::string ids;
  for (size_t i = 0; i < children.size(); ++i) ids += (i ? "," : "") + children[i];
  std::string out = type + " " + ids + " " + std::to_string(body.size());
  out.push_back('\0');
  out += body;
  return out;
}

Object inflate(const std::string& id, const std::string& content) {
  if (sha256_hex(content) != id) throw std::runtime_error("object " + id.substr(0, 12) + "… does not hash to its id");
  const size_t nul = content.find('\0');
  if (nul == std::string::npos || nul > 64 * 1024) throw std::runtime_error("object without a header");
  std::istringstream head(content.substr(0, nul));
  Object o;
  std::string kids, len;
  std::getline(head, o.type, ' ');
  std::getline(head, kids, ' ');
  std::getline(head, len);
  std::stringstream ks(kids);
  for (std::string k; std::getline(ks, k, ',');)
    if (!k.empty()) o.children.push_back(k);
  o.body = content.substr(nul + 1);
  if (std::to_string(o.body.size()) != len) throw std::runtime_error("object " + o.type + ": body length mismatch");
  return o;
}

// An object tree being built for a reply: contents by id, tree nodes by id.
struct Outbox {
  std::map<std::string, std::string> contents;
  std::map<std::string, fp::ObjectTree> trees;

  std::string add(const std::string& type, const std::vector<std::string>& children, const std::string& body) {
    std::vector<std::string> unique;
    for (const auto& c : children)
      if (std::find(unique.begin(), unique.end(), c) == unique.end()) unique.push_back(c);
    const std::string content = deflate(type, unique, body);
    const std::string id = sha256_hex(content);
    contents[id] = content;
    fp::ObjectTree t;
    t.set_object_id(id);
    for (const auto& c : unique) *t.add_children() = trees.at(c);
    trees[id] = t;
    return id;
  }
};

void post_order(const fp::ObjectTree& t, std::vector<std::string>* out) {
  for (const auto& c : t.children()) post_order(c, out);
  if (std::find(out->begin(), out->end(), t.object_id()) == out->end()) out->push_back(t.object_id());
}

// --- NumPy arrays ------------------------------------------------------------------------------------------

std::string shape_tuple(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

struct Records {
  std::map<std::string, FloatTensor> arrays;
  std::map<std::string, fp::ConfigRecordValue> config;
};

// The received message's content: its "arrays" (NumPy arrays by name) and "config" records.
Records read_content(const std::string& recorddict_id, const std::map<std::string, std::string>& store) {
  auto get = [&](const std::string& id, const std::string& type) {
    auto it = store.find(id);
    if (it == store.end()) throw std::runtime_error("object " + id.substr(0, 12) + "… was not received");
    Object o = inflate(id, it->second);
    if (o.type != type) throw std::runtime_error("expected a " + type + ", got a " + o.type);
    return o;
  };
  auto refs = [](const Object& o) -> json {
    json j = json::parse(o.body, nullptr, false);
    if (!j.is_object()) throw std::runtime_error(o.type + ": body is not a JSON object");
    return j;
  };
  Records out;
  Object rd = get(recorddict_id, "RecordDict");
  const json record_refs = refs(rd);  // kept alive: items() iterates it
  for (auto& [name, id] : record_refs.items()) {
    const std::string rid = id.get<std::string>();
    auto it = store.find(rid);
    if (it == store.end()) throw std::runtime_error("record " + name + " was not received");
    Object rec = inflate(rid, it->second);
    if (rec.type == "ConfigRecord") {
      fp::ConfigRecord cr;
      if (!cr.ParseFromString(rec.body)) throw std::runtime_error("record " + name + ": bad ConfigRecord");
      for (const auto& item : cr.items()) out.config[item.key()] = item.value();
    } else if (rec.type == "ArrayRecord") {
      const json array_refs = refs(rec);
      for (auto& [key, aid] : array_refs.items()) {
        Object arr = get(aid.get<std::string>(), "Array");
        json meta = refs(arr);
        if (meta.value("stype", "") != "numpy.ndarray") throw std::runtime_error(key + ": not a NumPy array");
        std::string npy;
        for (const auto& idx : meta.at("arraychunk_ids")) {
          const size_t i = idx.get<size_t>();
          if (i >= arr.children.size()) throw std::runtime_error(key + ": chunk index out of range");
          Object chunk = get(arr.children[i], "ArrayChunk");
          npy += chunk.body;
        }
        FloatTensor t;
        npy_decode(npy, &t.shape, &t.data);
        if (meta.at("shape").get<std::vector<int64_t>>() != t.shape)
          throw std::runtime_error(key + ": declared and stored shapes differ");
        out.arrays[key] = std::move(t);
      }
    }  // a MetricRecord from the server carries nothing the device needs
  }
  return out;
}

// --- the device's answers ----------------------------------------------------------------------------------

fp::ConfigRecordValue config_value(const Records& r, const std::string& key) {
  auto it = r.config.find(key);
  if (it == r.config.end()) throw std::runtime_error("the message has no config " + key);
  return it->second;
}
int64_t config_int(const Records& r, const std::string& key) {
  auto v = config_value(r, key);
  if (v.has_sint64()) return v.sint64();
  if (v.has_uint64()) return static_cast<int64_t>(v.uint64());
  throw std::runtime_error("config " + key + " is not an integer");
}
double config_float(const Records& r, const std::string& key) {
  auto v = config_value(r, key);
  if (v.has_double_()) return v.double_();
  if (v.has_sint64()) return static_cast<double>(v.sint64());
  throw std::runtime_error("config " + key + " is not a number");
}
bool config_bool(const Records& r, const std::string& key, bool fallback) {
  auto it = r.config.find(key);
  if (it == r.config.end()) return fallback;
  if (!it->second.has_bool_()) throw std::runtime_error("config " + key + " is not a bool");
  return it->second.bool_();
}

fp::MetricRecordValue metric_int(int64_t v) {
  fp::MetricRecordValue m;
  m.set_sint64(v);
  return m;
}
fp::MetricRecordValue metric_float(double v) {
  fp::MetricRecordValue m;
  m.set_double_(v);
  return m;
}

std::string metric_record(Outbox& box, const std::vector<std::pair<std::string, fp::MetricRecordValue>>& items) {
  fp::MetricRecord mr;
  for (const auto& [k, v] : items) {
    auto* item = mr.add_items();
    item->set_key(k);
    *item->mutable_value() = v;
  }
  std::string body;
  mr.SerializeToString(&body);
  return box.add("MetricRecord", {}, body);
}

std::string array_record(Outbox& box, const TensorMap& tensors) {
  json refs = json::object();
  std::vector<std::string> arrays;
  for (const auto& [name, t] : tensors) {
    const std::string npy = npy_encode_f32(t.shape, t.data.data());
    std::vector<std::string> chunks;
    json indices = json::array();
    std::vector<std::string> unique;
    for (size_t start = 0; start < npy.size(); start += kMaxChunk) {
      const std::string id = box.add("ArrayChunk", {}, npy.substr(start, kMaxChunk));
      auto it = std::find(unique.begin(), unique.end(), id);
      if (it == unique.end()) {
        unique.push_back(id);
        it = unique.end() - 1;
      }
      indices.push_back(static_cast<size_t>(it - unique.begin()));
    }
    json meta = {{"dtype", "float32"}, {"shape", t.shape}, {"stype", "numpy.ndarray"}, {"arraychunk_ids", indices}};
    const std::string aid = box.add("Array", unique, meta.dump());
    refs[name] = aid;
    arrays.push_back(aid);
  }
  return box.add("ArrayRecord", arrays, refs.dump());
}

class Device {
 public:
  explicit Device(const FleetConfig& c) : c_(c), batches_(read_batches(c.batches)) {
    if (c_.rank <= 0) throw std::runtime_error("--rank must be a positive packaged rank");
    trainer(c_.rank);  // the answer to the rank query must be trainable: load it now (and fail early)
  }

  Trainer& trainer(int rank) {
    auto it = trainers_.find(rank);
    if (it != trainers_.end()) return *it->second;
    auto t = std::make_unique<Trainer>(Paths::training(c_.package, rank), AdamWConfig{});
    if (batches_.batch_size != t->batch_size() || batches_.seq_len != t->seq_len())
      throw std::runtime_error("the batches are " + std::to_string(batches_.batch_size) + " x " +
                               std::to_string(batches_.seq_len) + ", the package trains " +
                               std::to_string(t->batch_size()) + " x " + std::to_string(t->seq_len()));
    return *trainers_.emplace(rank, std::move(t)).first->second;
  }

  // The reply's RecordDict id in `box`; throws to send an error reply instead.
  std::string handle(const std::string& type, const Records& in, Outbox& box, bool* last_round) {
    if (config_int(in, "protocol") != kProtocol)
      throw std::runtime_error("protocol " + std::to_string(config_int(in, "protocol")) + " (this device speaks 1)");
    if (type == "query") {
      const std::string metrics = metric_record(box, {{"rank", metric_int(c_.rank)}});
      say("rank query: answered rank " + std::to_string(c_.rank));
      return box.add("RecordDict", {metrics}, json({{"metrics", metrics}}).dump());
    }
    if (type != "train") throw std::runtime_error("unsupported message type " + type);
    const int rank = static_cast<int>(config_int(in, "rank"));
    Trainer& t = trainer(rank);
    const CompiledLora& lora = t.lora();
    if (std::abs(config_float(in, "lora-alpha") - lora.lora_alpha) > 1e-9 ||
        config_bool(in, "use-rslora", false) != lora.use_rslora)
      throw std::runtime_error("lora-alpha / use-rslora differ from the package's");
    const int64_t bs = config_int(in, "batch-size");
    if (bs != 0 && bs != t.batch_size())
      throw std::runtime_error("batch-size " + std::to_string(bs) + ": the package trains " +
                               std::to_string(t.batch_size()));
    const int64_t steps = config_int(in, "local-steps"), round = config_int(in, "server-round");
    if (steps < 1 || steps > 1000000) throw std::runtime_error("local-steps out of range");
    AdamWConfig opt;
    opt.lr = config_float(in, "lr");
    if (!(opt.lr > 0) || !std::isfinite(opt.lr)) throw std::runtime_error("lr must be positive");
    t.set_optimizer(opt);
    Adapter received;
    received.tensors = in.arrays;
    received.config_json = json({{"r", rank}, {"lora_alpha", lora.lora_alpha}, {"use_rslora", lora.use_rslora},
                                 {"peft_type", "LORA"}})
                               .dump();
    t.load_adapter(received);  // checks the modules and shapes; resets the optimizer
    const uint64_t n = batches_.count();
    const uint64_t first = static_cast<uint64_t>(config_int(in, "seed")) % n;
    const auto start = std::chrono::steady_clock::now();
    double total = 0;
    for (int64_t i = 0; i < steps; ++i) {
      const uint64_t b = (first + static_cast<uint64_t>(i)) % n;
      const float loss = t.step(batches_.ids(b), batches_.labels_of(b));
      if (!std::isfinite(loss)) throw std::runtime_error("training diverged at step " + std::to_string(i + 1));
      total += loss;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const Adapter trained = t.adapter();
    TensorMap out;
    for (const auto& [key, value] : in.arrays) out[key] = trained.tensors.at(key);  // exactly the keys received
    const int64_t examples = c_.num_examples > 0 ? c_.num_examples : static_cast<int64_t>(n * batches_.batch_size);
    const std::string arrays = array_record(box, out);
    const std::string metrics = metric_record(box, {{"num-examples", metric_int(examples)},
                                                    {"rank", metric_int(rank)},
                                                    {"loss", metric_float(total / static_cast<double>(steps))},
                                                    {"train-seconds", metric_float(seconds)}});
    char line[160];
    std::snprintf(line, sizeof line, "round %lld: trained rank %d, %lld steps, mean loss %.4f, %.1f s",
                  static_cast<long long>(round), rank, static_cast<long long>(steps), total / steps, seconds);
    say(line);
    auto it = in.config.find("num-rounds");
    *last_round = it != in.config.end() && it->second.has_sint64() && round >= it->second.sint64();
    return box.add("RecordDict", {arrays, metrics}, json({{"arrays", arrays}, {"metrics", metrics}}).dump());
  }

 private:
  const FleetConfig& c_;
  Batches batches_;
  std::map<int, std::unique_ptr<Trainer>> trainers_;
};

fp::Metadata reply_metadata(const fp::Metadata& in) {
  fp::Metadata m;
  const double now = unix_now();
  m.set_run_id(in.run_id());
  m.set_src_node_id(in.dst_node_id());
  m.set_dst_node_id(in.src_node_id());
  m.set_reply_to_message_id(in.message_id());
  m.set_group_id(in.group_id());
  m.set_created_at(now);
  m.set_ttl(std::max(1e-3, in.created_at() + in.ttl() - now));  // Flower: what is left of the instruction's
  m.set_message_type(in.message_type());
  m.set_src_task_id(in.dst_task_id());
  m.set_dst_task_id(in.src_task_id());
  return m;
}

class Node {
 public:
  explicit Node(const FleetConfig& c) : c_(c), id_(c.auth_key), api_(c, id_), beat_api_(c, id_), device_(c) {}

  int run() {
    connect();
    std::thread beat([this] { heartbeats(); });
    int status = 0;
    try {
      loop();
    } catch (const std::exception& e) {
      say(std::string("error: ") + e.what());
      status = 1;
    }
    g_stop = true;
    beat.join();
    disconnect();
    return status;
  }

 private:
  void connect() {
    const std::string pem = id_.public_pem();
    if (c_.auth_key.empty()) {  // self-registered, as a Python SuperNode without a key
      fp::RegisterNodeFleetRequest reg;
      reg.set_public_key(pem);
      retrying([&] { api_.call<fp::RegisterNodeFleetResponse>("register-node", reg); }, "register-node");
    }
    fp::ActivateNodeRequest act;
    act.set_public_key(pem);
    act.set_heartbeat_interval(c_.heartbeat_seconds);
    fp::ActivateNodeResponse r;
    retrying([&] { r = api_.call<fp::ActivateNodeResponse>("activate-node", act); }, "activate-node");
    node_.set_node_id(r.node_id());
    say("joined " + c_.server + " as node " + std::to_string(r.node_id()) + " (rank " + std::to_string(c_.rank) + ")");
  }

  void disconnect() {
    try {
      fp::DeactivateNodeRequest d;
      d.set_node_id(node_.node_id());
      api_.call<fp::DeactivateNodeResponse>("deactivate-node", d, 10);
      if (c_.auth_key.empty()) {
        fp::UnregisterNodeFleetRequest u;
        u.set_node_id(node_.node_id());
        api_.call<fp::UnregisterNodeFleetResponse>("unregister-node", u, 10);
      }
    } catch (const std::exception&) {  // the server may be gone already
    }
  }

  // Retries transport failures and 5xx (server starting, restarting) until max_wait_seconds, if set.
  template <typename F>
  void retrying(F&& f, const std::string& what) {
    const double since = unix_now();
    for (double wait = 0.5;; wait = std::min(wait * 2, 10.0)) {
      try {
        f();
        return;
      } catch (const HttpError& e) {
        if (e.status != 0 && e.status < 500) throw;
        if (g_stop || (c_.max_wait_seconds > 0 && unix_now() - since > c_.max_wait_seconds))
          throw std::runtime_error(what + ": the server was unreachable for " +
                                   std::to_string(static_cast<int>(unix_now() - since)) + " s: " + e.what());
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(wait));
    }
  }

  void heartbeats() {
    double next = unix_now() + c_.heartbeat_seconds / 2;
    while (!g_stop) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (unix_now() < next) continue;
      next = unix_now() + c_.heartbeat_seconds / 2;  // twice per interval: one lost beat is not a lapse
      try {
        fp::SendNodeHeartbeatRequest hb;
        *hb.mutable_node() = node_;
        hb.set_heartbeat_interval(c_.heartbeat_seconds);
        auto r = beat_api_.call<fp::SendNodeHeartbeatResponse>("send-node-heartbeat", hb, 10);
        if (!r.success()) say("heartbeat refused: the server does not know this node");
      } catch (const std::exception&) {  // the next one retries
      }
    }
  }

  void loop() {
    while (!g_stop) {
      fp::PullMessagesRequest pull;
      *pull.mutable_node() = node_;
      fp::PullMessagesResponse r;
      retrying([&] { r = api_.call<fp::PullMessagesResponse>("pull-messages", pull); }, "pull-messages");
      if (r.messages_list_size() == 0) {
        for (int i = 0; i < static_cast<int>(c_.poll_seconds * 10) && !g_stop; ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      if (r.message_object_trees_size() != 1) throw std::runtime_error("pull-messages: no object tree");
      bool last = false;
      const uint64_t run_id = r.messages_list(0).metadata().run_id();
      try {
        serve_one(r.messages_list(0), r.message_object_trees(0), &last);
      } catch (const HttpError& e) {
        if (e.status == 401 || e.status == 403) throw;  // not recognized any more: nothing to retry
        say(std::string("message dropped: ") + e.what());
      } catch (const std::exception& e) {  // a message that cannot be received or answered: wait for the next
        say(std::string("message dropped: ") + e.what());
      }
      if (last && c_.exit_on_finish) {
        say("the run's last round is trained: waiting for the run to end");
        say(wait_for_run_end(run_id) ? "the run is over: leaving" : "the run has not ended in time: leaving");
        return;
      }
    }
  }

  // The last reply is pushed, but the ServerApp may not have pulled it yet, and the SuperLink answers a reply
  // whose node has deactivated with "Node Unavailable". So the node stays (heartbeating) while the run is
  // running: Fleet.GetRun answers a run until it is finished, then an error (Flower refuses GetRun for a
  // finished run), and a SuperLink that has shut down does not answer at all. At most kFinishGraceSeconds, as
  // `lorafleet client --exit-on-finish` waits. True when the run ended within that time.
  bool wait_for_run_end(uint64_t run_id) {
    const double until = unix_now() + kFinishGraceSeconds;
    while (!g_stop && unix_now() < until) {
      try {
        fp::GetRunRequest req;
        *req.mutable_node() = node_;
        req.set_run_id(run_id);
        const auto r = api_.call<fp::GetRunResponse>("get-run", req, 10);
        if (r.run().has_status() && r.run().status().status() == "finished") return true;
      } catch (const std::exception&) {  // finished (refused) or the SuperLink is gone: the run is over
        return true;
      }
      for (int i = 0; i < std::max(1, static_cast<int>(c_.poll_seconds * 10)) && !g_stop; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  void serve_one(const fp::Message& msg, const fp::ObjectTree& tree, bool* last) {
    const auto& md = msg.metadata();
    const auto started = std::chrono::steady_clock::now();
    std::vector<std::string> ids;
    post_order(tree, &ids);
    std::map<std::string, std::string> store;
    size_t total = 0;
    for (const auto& id : ids) {
      fp::PullObjectRequest req;
      *req.mutable_node() = node_;
      req.set_run_id(md.run_id());
      req.set_object_id(id);
      for (int attempt = 0;; ++attempt) {
        fp::PullObjectResponse res;
        retrying([&] { res = api_.call<fp::PullObjectResponse>("pull-object", req); }, "pull-object");
        if (!res.object_found()) throw std::runtime_error("object " + id.substr(0, 12) + "… not found");
        if (res.object_available()) {
          if (res.object_content().size() > kMaxObjectBytes) throw std::runtime_error("an object is too large");
          total += res.object_content().size();
          if (total > kMaxMessageBytes) throw std::runtime_error("the message is too large");
          store[id] = res.object_content();
          break;
        }
        if (attempt > 600) throw std::runtime_error("object " + id.substr(0, 12) + "… never became available");
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    fp::ConfirmMessageReceivedRequest confirm;
    *confirm.mutable_node() = node_;
    confirm.set_run_id(md.run_id());
    confirm.set_message_object_id(md.message_id());
    retrying([&] { api_.call<fp::ConfirmMessageReceivedResponse>("confirm-message-received", confirm); },
             "confirm-message-received");

    Outbox box;
    fp::Message reply;
    *reply.mutable_metadata() = reply_metadata(md);
    std::string content;
    try {
      Object root = inflate(tree.object_id(), store.at(tree.object_id()));
      if (root.type != "Message" || root.children.size() != 1) throw std::runtime_error("a message without content");
      Records in = read_content(root.children[0], store);
      content = device_.handle(md.message_type(), in, box, last);
    } catch (const std::exception& e) {
      say(std::string("replying with an error: ") + e.what());
      reply.mutable_error()->set_code(kErrorClientAppRaised);
      reply.mutable_error()->set_reason(e.what());
      content.clear();
    }
    // The message object: its metadata (message_id empty) and error, serialized deterministically; its id is
    // the reply's message_id.
    fp::Message body_msg;
    *body_msg.mutable_metadata() = reply.metadata();
    if (reply.has_error()) *body_msg.mutable_error() = reply.error();
    std::string body;
    {
      google::protobuf::io::StringOutputStream sos(&body);
      google::protobuf::io::CodedOutputStream cos(&sos);
      cos.SetSerializationDeterministic(true);
      body_msg.SerializeToCodedStream(&cos);
    }
    const std::string message_id =
        box.add("Message", content.empty() ? std::vector<std::string>{} : std::vector<std::string>{content}, body);
    reply.mutable_metadata()->set_message_id(message_id);
    if (!reply.has_error()) reply.mutable_content();  // present and empty: the content travels as objects

    fp::PushMessagesRequest push;
    *push.mutable_node() = node_;
    *push.add_messages_list() = reply;
    *push.add_message_object_trees() = box.trees.at(message_id);
    push.add_clientapp_runtime_list(std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    fp::PushMessagesResponse pushed;
    retrying([&] { pushed = api_.call<fp::PushMessagesResponse>("push-messages", push); }, "push-messages");
    std::set<std::string> wanted(pushed.objects_to_push().begin(), pushed.objects_to_push().end());
    std::vector<std::string> order;
    post_order(box.trees.at(message_id), &order);
    for (const auto& id : order) {
      if (!wanted.count(id)) continue;
      fp::PushObjectRequest po;
      *po.mutable_node() = node_;
      po.set_run_id(md.run_id());
      po.set_object_id(id);
      po.set_object_content(box.contents.at(id));
      po.set_session_id(pushed.session_id());
      retrying([&] { api_.call<fp::PushObjectResponse>("push-object", po); }, "push-object");
    }
  }

  const FleetConfig& c_;
  Identity id_;
  FleetApi api_, beat_api_;  // one connection for the heartbeats, one for the rest
  Device device_;
  fp::Node node_;
};

}  // namespace

std::string npy_encode_f32(const std::vector<int64_t>& shape, const float* data) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_tuple(shape) + ", }";
  const size_t unpadded = 6 + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>(header.size() >> 8));
  out += header;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, data + i, 4);
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((bits >> (8 * b)) & 0xff));
  }
  return out;
}

void npy_decode(const std::string& npy, std::vector<int64_t>* shape, std::vector<float>* data) {
  if (npy.size() < 10 || npy.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error("not a .npy array");
  const int major = static_cast<unsigned char>(npy[6]);
  size_t len, start;
  if (major == 1) {
    len = static_cast<unsigned char>(npy[8]) | static_cast<size_t>(static_cast<unsigned char>(npy[9])) << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (npy.size() < 12) throw std::runtime_error("truncated .npy header");
    len = 0;
    for (int i = 3; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(npy[8 + i]);
    start = 12;
  } else {
    throw std::runtime_error(".npy version " + std::to_string(major));
  }
  if (start + len > npy.size() || len > 65536) throw std::runtime_error("bad .npy header length");
  const std::string h = npy.substr(start, len);
  auto field = [&](const std::string& key) {
    const size_t k = h.find("'" + key + "':");
    if (k == std::string::npos) throw std::runtime_error(".npy header lacks " + key);
    return h.substr(k + key.size() + 3);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  size_t width = descr == "<f4" ? 4 : descr == "<f2" ? 2 : descr == "<f8" ? 8 : 0;
  if (width == 0) throw std::runtime_error(".npy dtype " + descr + " is not a little-endian float");
  if (field("fortran_order").find("False") != 1 && field("fortran_order").find("False") != 0)
    throw std::runtime_error(".npy array is not in C order");
  std::string sh = field("shape");
  sh = sh.substr(sh.find('(') + 1);
  sh = sh.substr(0, sh.find(')'));
  shape->clear();
  std::stringstream ss(sh);
  uint64_t n = 1;
  for (std::string d; std::getline(ss, d, ',');) {
    d.erase(std::remove(d.begin(), d.end(), ' '), d.end());
    if (d.empty()) continue;
    const long long v = std::stoll(d);
    if (v < 0 || v > (1ll << 40)) throw std::runtime_error(".npy shape out of range");
    shape->push_back(v);
    n *= static_cast<uint64_t>(v);
  }
  const size_t at = start + len;
  if (npy.size() - at != n * width) throw std::runtime_error(".npy data length does not match its shape");
  data->resize(n);
  const auto* p = reinterpret_cast<const unsigned char*>(npy.data() + at);
  for (uint64_t i = 0; i < n; ++i) {
    float f;
    if (width == 4) {
      uint32_t bits = uint32_t(p[4 * i]) | uint32_t(p[4 * i + 1]) << 8 | uint32_t(p[4 * i + 2]) << 16 |
                      uint32_t(p[4 * i + 3]) << 24;
      std::memcpy(&f, &bits, 4);
    } else if (width == 8) {
      uint64_t bits = 0;
      for (int b = 7; b >= 0; --b) bits = (bits << 8) | p[8 * i + b];
      double d;
      std::memcpy(&d, &bits, 8);
      f = static_cast<float>(d);
    } else {
      f = half_to_float(static_cast<uint16_t>(p[2 * i] | p[2 * i + 1] << 8));
    }
    if (!std::isfinite(f)) throw std::runtime_error("an array holds a non-finite value");
    (*data)[i] = f;
  }
}

int run_fleet_node(const FleetConfig& config) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  int status;
  {
    Node node(config);
    status = node.run();
  }
  curl_global_cleanup();
  return status;
}

}  // namespace lorafleet::native
