// The native runners' side of the worker protocol (cloformer_deploy/targets/worker.py): JSON lines on
// stdin/stdout, arrays as {"dtype", "shape", "data": base64}. Commands: open, run, time, rss, thermal,
// about, quit. A runner is one format's Model behind serve(); everything here is the project's own code.
//
// Only the C++ standard library and POSIX are used, so that a runner needs nothing on a device but the
// libraries its bundle carries.
#pragma once

#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace cfd {

// ---------------------------------------------------------------- JSON (what the host's json.dumps writes)
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool boolean = false;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* get(const std::string& key) const {
    for (const auto& f : fields)
      if (f.first == key) return &f.second;
    return nullptr;
  }
  bool has(const std::string& key) const {
    const Json* v = get(key);
    return v && v->kind != Null;
  }
};

// A field the message must have, of the kind it must be: a message without it is an error answer, not a crash.
inline const Json& need(const Json& m, const std::string& key, Json::Kind kind) {
  const Json* v = m.get(key);
  if (!v || v->kind != kind) throw std::runtime_error("bad message: no valid '" + key + "'");
  return *v;
}

// A whole number in [lo, hi], as the host sends counts and sizes.
inline long long whole(const Json& v, long long lo, long long hi, const char* what) {
  if (v.kind != Json::Number || !(v.number >= static_cast<double>(lo)) || !(v.number <= static_cast<double>(hi)) ||
      v.number != static_cast<double>(static_cast<long long>(v.number)))
    throw std::runtime_error(std::string("bad message: ") + what + " is not a whole number in range");
  return static_cast<long long>(v.number);
}

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  [[noreturn]] void fail(const char* why) { throw std::runtime_error(std::string("bad message: ") + why); }
  void space() {
    while (i_ < s_.size() && isspace(static_cast<unsigned char>(s_[i_]))) i_++;
  }
  bool take(const char* word) {
    size_t n = strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned cp = static_cast<unsigned>(std::stoul(s_.substr(i_, 4), nullptr, 16));
    i_ += 4;
    return cp;
  }
  std::string string() {
    std::string out;
    i_++;  // the opening quote
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("bad escape");
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && take("\\u")) cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          utf8(out, cp);
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
  }
  Json value() {
    space();
    if (i_ >= s_.size()) fail("empty");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Json::Object;
      i_++;
      space();
      if (i_ < s_.size() && s_[i_] == '}') return i_++, v;
      while (true) {
        space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
        std::string key = string();
        space();
        if (i_ >= s_.size() || s_[i_++] != ':') fail("expected ':'");
        v.fields.emplace_back(key, value());
        space();
        if (i_ < s_.size() && s_[i_] == ',') { i_++; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { i_++; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Json::Array;
      i_++;
      space();
      if (i_ < s_.size() && s_[i_] == ']') return i_++, v;
      while (true) {
        v.items.push_back(value());
        space();
        if (i_ < s_.size() && s_[i_] == ',') { i_++; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { i_++; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Json::String;
      v.text = string();
      return v;
    }
    if (take("true")) { v.kind = Json::Bool; v.boolean = true; return v; }
    if (take("false")) { v.kind = Json::Bool; return v; }
    if (take("null")) return v;
    size_t used = 0;
    v.kind = Json::Number;
    try {
      v.number = std::stod(s_.substr(i_, 40), &used);
    } catch (...) {
      fail("expected a value");
    }
    i_ += used;
    return v;
  }
};

inline std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

inline std::string number(double x) {
  char buf[32];
  snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// ---------------------------------------------------------------- arrays
static const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

inline std::string base64(const uint8_t* p, size_t n) {
  std::string out;
  out.reserve((n + 2) / 3 * 4);
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = p[i] << 16 | (i + 1 < n ? p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += i + 1 < n ? kB64[(v >> 6) & 63] : '=';
    out += i + 2 < n ? kB64[v & 63] : '=';
  }
  return out;
}

inline std::vector<uint8_t> unbase64(const std::string& s) {
  static int8_t table[256];
  static bool ready = false;
  if (!ready) {
    memset(table, -1, sizeof table);
    for (int i = 0; i < 64; i++) table[static_cast<uint8_t>(kB64[i])] = static_cast<int8_t>(i);
    ready = true;
  }
  std::vector<uint8_t> out;
  out.reserve(s.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char c : s) {
    if (c == '=') break;
    int8_t d = table[c];
    if (d < 0) throw std::runtime_error("bad message: the array's data is not base64");
    acc = acc << 6 | static_cast<uint32_t>(d);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>(acc >> bits));
    }
  }
  return out;
}

// A float32 array as the host sent it (the images' tensor), in C order.
struct FloatArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

inline FloatArray unpack(const Json& m) {
  if (m.kind != Json::Object || need(m, "dtype", Json::String).text != "float32")
    throw std::runtime_error("the tensor must be float32");
  FloatArray a;
  size_t count = 1;
  for (const Json& d : need(m, "shape", Json::Array).items) {
    long long n = whole(d, 0, 1 << 24, "a dimension");
    a.shape.push_back(n);
    count *= static_cast<size_t>(n);
    if (count > (size_t{1} << 31)) throw std::runtime_error("bad message: the tensor is too large");
  }
  std::vector<uint8_t> raw = unbase64(need(m, "data", Json::String).text);
  if (raw.size() != count * sizeof(float)) throw std::runtime_error("the tensor's data does not match its shape");
  a.data.resize(count);
  memcpy(a.data.data(), raw.data(), raw.size());
  return a;
}

inline std::string pack(const std::vector<float>& data, const std::vector<int64_t>& shape) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); i++) dims += (i ? ", " : "") + std::to_string(shape[i]);
  return "{\"dtype\": \"float32\", \"shape\": [" + dims + "], \"data\": \"" +
         base64(reinterpret_cast<const uint8_t*>(data.data()), data.size() * sizeof(float)) + "\"}";
}

// IEEE half precision, rounded to nearest even as numpy's astype(float16) rounds
inline uint16_t to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t mag = x & 0x7FFFFFFF;
  if (mag >= 0x7F800000) return static_cast<uint16_t>(sign | 0x7C00 | (mag > 0x7F800000 ? 0x200 : 0));
  if (mag >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // rounds to infinity
  if (mag < 0x38800000) {  // a subnormal half (or zero)
    if (mag < 0x33000000) return static_cast<uint16_t>(sign);
    uint32_t m = (mag & 0x7FFFFF) | 0x800000;
    int shift = 113 - static_cast<int>(mag >> 23) + 13;
    uint32_t half = m >> shift;
    uint32_t rest = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rest > mid || (rest == mid && (half & 1))) half++;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = ((mag - 0x38000000) >> 13);
  uint32_t rest = mag & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
  return static_cast<uint16_t>(sign | half);
}

inline float from_half(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, x;
  if (exp == 0) {
    if (man == 0) {
      x = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      x = sign | exp << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    x = sign | 0x7F800000 | man << 13;
  } else {
    x = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

// ---------------------------------------------------------------- the process
// This address space's peak resident memory: ru_maxrss would carry the parent's across fork and exec.
inline double peak_rss_mb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return atof(line.c_str() + 6) / 1024.0;
  return -1;
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

inline std::string trim(std::string s) {
  while (!s.empty() && isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

// An error answer as the Python worker gives it: the first line, at most 300 characters.
inline std::string error_text(const std::string& kind, const std::string& what) {
  std::string text = kind + ": " + what.substr(0, what.find('\n'));
  return text.substr(0, 300);
}

inline std::string thermal_zones() {
  std::vector<std::pair<int, std::string>> zones;
  if (DIR* d = opendir("/sys/class/thermal")) {
    while (dirent* e = readdir(d)) {
      if (strncmp(e->d_name, "thermal_zone", 12) != 0) continue;
      std::string dir = std::string("/sys/class/thermal/") + e->d_name;
      std::string kind = trim(read_text(dir + "/type")), temp = trim(read_text(dir + "/temp"));
      if (kind.empty() || temp.empty()) continue;  // a zone that cannot be read (asleep, or guarded)
      zones.emplace_back(atoi(e->d_name + 12), quote(std::string(e->d_name) + " " + kind) + ": " +
                                                   number(atof(temp.c_str()) / 1000.0));
    }
    closedir(d);
  }
  std::sort(zones.begin(), zones.end());
  std::string out = "{";
  for (size_t i = 0; i < zones.size(); i++) out += (i ? ", " : "") + zones[i].second;
  return out + "}";
}

// What the device is, read the way the Python worker reads it; the host groups the cores (cpu_clusters).
inline std::string about(const std::string& runtime, const std::string& version) {
  utsname u{};
  uname(&u);
  cpu_set_t set;
  std::string affinity;
  if (sched_getaffinity(0, sizeof set, &set) == 0)
    for (int i = 0; i < CPU_SETSIZE; i++)
      if (CPU_ISSET(i, &set)) affinity += (affinity.empty() ? "" : ", ") + std::to_string(i);
  std::string machine = u.machine, system = u.sysname;
  std::string lower = machine;
  for (char& c : lower) c = static_cast<char>(tolower(c));
  return "{\"machine\": " + quote(machine) + ", \"system\": " + quote(system) + ", \"python\": null" +
         ", \"platform\": " + quote("linux-" + lower) + ", \"cores\": " + std::to_string(sysconf(_SC_NPROCESSORS_ONLN)) +
         ", \"cpuinfo\": " + quote(read_text("/proc/cpuinfo")) + ", \"affinity\": [" + affinity + "]" +
         ", \"can_pin\": true, \"versions\": {" + quote(runtime) + ": " + quote(version) + "}}";
}

inline bool pin(const std::string& cores) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::stringstream s(cores);
  std::string part;
  while (std::getline(s, part, ',')) {
    size_t dash = part.find('-');
    int lo = atoi(part.substr(0, dash).c_str()), hi = dash == std::string::npos ? lo : atoi(part.substr(dash + 1).c_str());
    for (int i = lo; i <= hi; i++) CPU_SET(i, &set);
  }
  return sched_setaffinity(0, sizeof set, &set) == 0;
}

// ---------------------------------------------------------------- one format's model
class Model {
 public:
  virtual ~Model() = default;
  // Fields of the "describe" answer (without braces): how it runs, and what the program states of its memory.
  virtual std::string describe() = 0;
  // Problems of the program's interface against the spec the host sent (its input size, classes, batch).
  virtual std::vector<std::string> problems(const Json& spec) = 0;
  // The input in the runtime's own form, made once (an fp16 program's images converted here, not when timed).
  virtual void prepare(const FloatArray& tensor) = 0;
  virtual void infer() = 0;
  // Outputs of the last run, the logits first; beyond the first, a file's block boundaries (an integer tensor as its
  // integer values: the host, which knows the file, dequantises).
  virtual size_t output_count() { return 1; }
  virtual std::vector<float> output_at(size_t index, std::vector<int64_t>& shape) = 0;
  std::vector<float> output(std::vector<int64_t>& shape) { return output_at(0, shape); }
};

// Opens a program: its path, its thread count (0: the runtime's default) and the whole "open" message, whose
// further fields a runner may read (LiteRT's "accelerator").
using Opener = std::function<std::unique_ptr<Model>(const std::string& path, int threads, const Json& open)>;

inline double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

struct Lines {  // stdin's lines, read by a thread: when stdin closes the caller is gone, and so is this process
  std::mutex m;
  std::condition_variable ready;
  std::deque<std::string> queue;
  bool idle = true;
};

inline void read_lines(Lines* lines) {
  std::string pending;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      std::lock_guard<std::mutex> g(lines->m);
      lines->queue.push_back(line);
      lines->ready.notify_one();
    }
  }
  // a step in progress has no reader for its answer (a dropped link, a caller that timed out): a moment, then end
  for (int i = 0; i < 50; i++) {
    {
      std::lock_guard<std::mutex> g(lines->m);
      if (lines->idle && lines->queue.empty()) break;
    }
    usleep(100000);
  }
  _exit(0);
}

// The runner's main: ``runner [--cores 4-7] [--keep N]``. Answers on the real stdout; libraries' prints go to stderr.
inline int serve(int argc, char** argv, const std::string& runtime, const std::string& version, const Opener& open) {
  size_t keep = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--cores" && !pin(argv[i + 1])) {
      fprintf(stderr, "cannot run on cores %s\n", argv[i + 1]);
      return 2;
    }
    if (flag == "--keep") keep = static_cast<size_t>(std::max(1, atoi(argv[i + 1])));
  }
  FILE* proto = fdopen(dup(1), "w");
  dup2(2, 1);
  auto reply = [&](const std::string& s) {
    fputs(s.c_str(), proto);
    fputc('\n', proto);
    fflush(proto);
  };
  // never freed: the reader thread may outlive this function until the process ends
  Lines& lines = *new Lines();
  std::thread(read_lines, &lines).detach();
  std::unique_ptr<Model> model;
  std::map<std::string, FloatArray> batches;
  std::deque<std::string> order;  // keys, oldest first, as the host counts them
  bool prepared = false;
  while (true) {
    std::string line;
    {
      std::unique_lock<std::mutex> g(lines.m);
      lines.idle = true;
      if (!lines.ready.wait_for(g, std::chrono::hours(1), [&] { return !lines.queue.empty(); })) break;
      line = lines.queue.front();
      lines.queue.pop_front();
      lines.idle = false;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // as the Python worker: no answer
    try {
      Json cmd = JsonParser(line).parse();
      const Json* op = cmd.get("cmd");
      std::string name = op ? op->text : "";
      if (name == "quit") break;
      if (name == "open") {
        const Json* threads = cmd.get("threads");
        const std::string& path = need(cmd, "path", Json::String).text;
        int count = threads && threads->kind == Json::Number ? static_cast<int>(whole(*threads, 0, 1024, "threads")) : 0;
        auto t = std::chrono::steady_clock::now();
        prepared = false;
        model.reset();  // the previous program's memory is freed first, as a new process would have it
        model = open(path, count, cmd);
        double load = ms_since(t);
        std::string problems;
        if (const Json* spec = cmd.get("spec"))
          for (const auto& p : model->problems(*spec)) problems += (problems.empty() ? "" : ", ") + quote(p);
        reply("{\"load_ms\": " + number(load) + ", \"describe\": {" + model->describe() + "}, \"problems\": [" +
              problems + "]}");
      } else if (name == "run") {
        if (!model) throw std::runtime_error("no program is open");
        const std::string key = cmd.has("key") ? cmd.get("key")->text : "";
        const FloatArray* batch;
        FloatArray sent;
        if (cmd.has("tensor")) {
          sent = unpack(*cmd.get("tensor"));
          if (!key.empty()) {
            if (!batches.count(key)) order.push_back(key);
            batches[key] = sent;
            while (order.size() > keep) {  // keep >= 1: the batch just added stays
              batches.erase(order.front());
              order.pop_front();
            }
            batch = &batches.find(key)->second;
          } else {
            batch = &sent;
          }
        } else {
          auto found = batches.find(key);
          if (found == batches.end()) throw std::out_of_range("no batch " + key);
          batch = &found->second;
        }
        model->prepare(*batch);
        prepared = true;
        auto t = std::chrono::steady_clock::now();
        model->infer();
        double ms = ms_since(t);
        std::vector<int64_t> shape;
        std::vector<float> out = model->output(shape);
        std::string every;
        const Json* all = cmd.get("all");
        if (all && all->kind == Json::Bool && all->boolean) {  // every output: a file showing its block boundaries
          every = ", \"outputs\": [" + pack(out, shape);
          for (size_t i = 1; i < model->output_count(); i++) {
            std::vector<int64_t> more_shape;
            std::vector<float> more = model->output_at(i, more_shape);
            every += ", " + pack(more, more_shape);
          }
          every += "]";
        }
        reply("{\"ms\": " + number(ms) + ", \"logits\": " + pack(out, shape) + every + "}");
      } else if (name == "time") {
        if (!model || !prepared) throw std::runtime_error("no batch has run yet");
        long long n = whole(need(cmd, "n", Json::Number), 0, 100000000, "n");
        std::string times;
        for (long long i = 0; i < n; i++) {
          auto t = std::chrono::steady_clock::now();
          model->infer();
          times += (i ? ", " : "") + number(ms_since(t));
        }
        reply("{\"times_ms\": [" + times + "]}");
      } else if (name == "rss") {
        reply("{\"peak_rss_mb\": " + number(peak_rss_mb()) + "}");
      } else if (name == "thermal") {
        reply("{\"zones\": " + thermal_zones() + "}");
      } else if (name == "about") {
        reply(about(runtime, version));
      } else {
        reply("{\"error\": " + quote("unknown command '" + name + "'") + "}");
      }
    } catch (const std::out_of_range& e) {
      reply("{\"error\": " + quote(error_text("KeyError", e.what())) + "}");
    } catch (const std::exception& e) {  // report, do not crash: the host makes it an error row or a failed check
      reply("{\"error\": " + quote(error_text("RuntimeError", e.what())) + "}");
    }
  }
  fflush(proto);
  _exit(0);  // at once: the reader thread may still be blocked in read()
}

}  // namespace cfd
