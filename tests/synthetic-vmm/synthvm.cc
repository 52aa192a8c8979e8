// synthvm: a synthetic VMM that the real ftd protects unchanged (issue 3: a replication session
// end to end where QEMU cannot run, e.g. inside the RDMA lab guest).
//
// It accepts the subset of a QEMU command line that ftd and make_twin_cmdline produce or keep:
//   -name N  -m SIZE  -machine ...,memory-backend=mem0
//   -object memory-backend-memfd,id=mem0,size=SIZE,share=on
//   -qmp unix:PATH,server=on,wait=off
//   -chardev socket,id=ser0,path=P,server=on,wait=off | file,id=ser0,path=P   -serial chardev:ser0
//   -S  -incoming defer  -append "synth_rate_kib_s=N synth_tick_ms=N synth_seed=N"
//   -global ..., -nodefaults, -display ..., -no-user-config, -monitor none: ignored
//
// Guest "RAM" is a memfd mapped shared (ftd finds it in /proc/PID/maps and /proc/PID/fd).
// Page 0 is the control page ("vCPU-visible" state: tick counter, RNG state, write count); every
// other page i at generation g >= 1 holds [u64 i][u64 g][u64 XXH3(rest, seed i)][bytes from
// (i, g)], so any page can be checked byte for byte. A worker thread (the "vCPU") rewrites random
// pages at synth_rate_kib_s and every synth_tick_ms increments the tick in RAM and prints
// "tick N" on the console. Device state (xen-save-devices-state) is a blob with the tick, RNG
// state and every page's generation; migrate-incoming reads it, checks the whole RAM against it
// (every page regenerated and compared) and the worker continues exactly from there after cont.
//
// QMP: greeting, qmp_capabilities, one client at a time, replies with "return" or "error"
// {class, desc}, events STOP/RESUME/SHUTDOWN. Commands: query-status, query-memdev, stop, cont,
// add-fd, remove-fd, getfd, closefd, xen-save-devices-state, migrate-incoming, query-migrate,
// announce-self, quit, query-commands, query-name. `stop` returns only once the worker is parked
// (QEMU's vm_stop semantics).
//
// Test helpers (not VMM modes), see usage():
//   synthvm --tool console SOCK OUT        copy a console socket to OUT as "WALL_MS LINE" lines
//   synthvm --tool check-failover ...      activation record + console continuity checks
//   synthvm --tool scan-ram PID            every page of a running synthvm (or twin) is consistent
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/process.h"
#include "vmm-glue/qemu_cmdline.h"

using ftvm::check_sys;
using ftvm::Error;
using ftvm::fail;
using ftvm::SysError;
using ftvm::UniqueFd;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kRamMagic = 0x4d415248544e5953ULL;  // "SYNTHRAM"
constexpr char kBlobMagic[8] = {'S', 'Y', 'N', 'T', 'H', 'D', 'S', '1'};

double wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void logf(const std::string& s) {
  std::string line = fmt::format("synthvm[{}]: {}\n", ::getpid(), s);
  ssize_t n = ::write(2, line.data(), line.size());
  (void)n;  // stderr is best effort
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The content of data page `idx` at generation `gen`.
void fill_page(uint8_t* p, uint64_t idx, uint64_t gen) {
  uint64_t w[kPage / 8];
  uint64_t s = idx * 0x100000001b3ULL ^ (gen << 1) ^ 0x5bd1e995ULL;
  for (size_t k = 3; k < kPage / 8; k++) w[k] = splitmix(s);
  w[0] = idx;
  w[1] = gen;
  w[2] = XXH3_64bits_withSeed(reinterpret_cast<const uint8_t*>(w) + 24, kPage - 24, idx);
  std::memcpy(p, w, kPage);
}

// Why page `idx` is not a valid page at generation `gen` (gen 0: any valid generation); empty
// when it is. Compares every byte with the regenerated page.
std::string check_page(const uint8_t* p, uint64_t idx, uint64_t gen, uint64_t* seen_gen = nullptr) {
  uint64_t h[3];
  std::memcpy(h, p, sizeof h);
  if (seen_gen) *seen_gen = h[1];
  if (h[0] != idx) return fmt::format("page {} header says index {} (generation {})", idx, h[0], h[1]);
  if (gen != 0 && h[1] != gen) return fmt::format("page {} is at generation {}, expected {}", idx, h[1], gen);
  if (h[1] == 0) return fmt::format("page {} has generation 0", idx);
  if (XXH3_64bits_withSeed(p + 24, kPage - 24, idx) != h[2])
    return fmt::format("page {} generation {}: checksum mismatch", idx, h[1]);
  uint8_t want[kPage];
  fill_page(want, idx, h[1]);
  if (std::memcmp(want, p, kPage) != 0)
    return fmt::format("page {} generation {}: content differs from the regenerated page", idx, h[1]);
  return {};
}

uint64_t parse_size(const std::string& v, const char* what, uint64_t default_unit) {
  if (v.empty()) fail("{}: empty size", what);
  size_t pos = 0;
  unsigned long long n = 0;
  try {
    n = std::stoull(v, &pos, 0);
  } catch (const std::exception&) {
    fail("{}: '{}' is not a size", what, v);
  }
  uint64_t unit = default_unit;
  if (pos < v.size()) {
    std::string suf = v.substr(pos);
    if (suf == "k" || suf == "K") unit = 1ULL << 10;
    else if (suf == "M" || suf == "m") unit = 1ULL << 20;
    else if (suf == "G" || suf == "g") unit = 1ULL << 30;
    else if (suf == "B" || suf == "b") unit = 1;
    else fail("{}: unknown size suffix in '{}'", what, v);
  }
  return n * unit;
}

std::map<std::string, std::string> keyvals(const std::string& v, const std::string& implied) {
  std::map<std::string, std::string> m;
  bool first = true;
  for (auto& it : ftvm::vmm::split_keyval(v)) {
    auto eq = it.find('=');
    if (eq == std::string::npos) {
      if (first && !implied.empty()) m[implied] = it;
      else m[it] = "on";
    } else {
      m[it.substr(0, eq)] = it.substr(eq + 1);
    }
    first = false;
  }
  return m;
}

void write_all(int fd, const void* data, size_t len, const std::string& what) {
  auto p = static_cast<const uint8_t*>(data);
  while (len) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SysError(errno, what);
    if (n == 0) fail("{}: wrote nothing", what);
    p += n;
    len -= static_cast<size_t>(n);
  }
}

bool send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // peer gone: the caller drops the client
    off += static_cast<size_t>(n);
  }
  return true;
}

UniqueFd listen_unix(const std::string& path) {
  sockaddr_un a{};
  if (path.size() >= sizeof a.sun_path) fail("socket path '{}' is too long ({} bytes at most)", path, sizeof a.sun_path - 1);
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), path.size());
  UniqueFd fd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket(AF_UNIX)"));
  if (::unlink(path.c_str()) < 0 && errno != ENOENT) throw SysError(errno, "unlink stale socket " + path);
  check_sys(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), "bind " + path);
  check_sys(::listen(fd.get(), 8), "listen " + path);
  return fd;
}

// ---------------------------------------------------------------------------------------------
// Command line

struct Config {
  std::string name = "synthvm";
  uint64_t ram_size = 0, m_size = 0;
  std::string backend_id, machine_backend;
  bool backend_share = false;
  std::string qmp_path;
  std::string console_id, console_backend, console_path;
  bool console_append = false;
  bool start_paused = false;
  bool incoming_defer = false;
  double rate_kib_s = 1024;
  unsigned tick_ms = 100;
  uint64_t seed = 1;
};

Config parse_cmdline(int argc, char** argv) {
  Config c;
  std::map<std::string, std::map<std::string, std::string>> chardevs;
  std::string serial;
  const std::vector<std::string> ignored_with_arg = {"global", "display", "monitor", "accel", "cpu", "smp", "vga"};
  const std::vector<std::string> ignored_flags = {"nodefaults", "no-user-config", "no-reboot", "no-shutdown",
                                                  "nographic", "enable-kvm"};
  for (int i = 1; i < argc; i++) {
    std::string o = argv[i];
    if (o.rfind("--", 0) == 0) o = o.substr(1);
    if (o.empty() || o[0] != '-') fail("unexpected argument '{}' (synthvm takes QEMU-style options)", argv[i]);
    o = o.substr(1);
    if (o == "S") {
      c.start_paused = true;
      continue;
    }
    if (std::find(ignored_flags.begin(), ignored_flags.end(), o) != ignored_flags.end()) continue;
    if (i + 1 >= argc) fail("option -{} needs a value", o);
    std::string v = argv[++i];
    if (std::find(ignored_with_arg.begin(), ignored_with_arg.end(), o) != ignored_with_arg.end()) continue;
    if (o == "name") {
      auto kv = keyvals(v, "guest");
      c.name = kv.count("guest") ? kv["guest"] : v;
    } else if (o == "m") {
      auto kv = keyvals(v, "size");
      c.m_size = parse_size(kv["size"], "-m", 1ULL << 20);
    } else if (o == "machine" || o == "M") {
      auto kv = keyvals(v, "type");
      if (kv.count("memory-backend")) c.machine_backend = kv["memory-backend"];
    } else if (o == "object") {
      auto kv = keyvals(v, "qom-type");
      if (kv["qom-type"] != "memory-backend-memfd")
        fail("-object {}: synthvm only knows memory-backend-memfd", v);
      if (!c.backend_id.empty()) fail("-object {}: a second memory backend ({} exists)", v, c.backend_id);
      c.backend_id = kv["id"];
      c.ram_size = parse_size(kv["size"], "memory-backend-memfd size", 1);
      c.backend_share = ftvm::vmm::qemu_bool(kv.count("share") ? kv["share"] : "off");
    } else if (o == "qmp") {
      if (v.rfind("unix:", 0) != 0) fail("-qmp {}: only unix:PATH,server=on,wait=off is supported", v);
      auto items = ftvm::vmm::split_keyval(v.substr(5));
      c.qmp_path = items[0];
    } else if (o == "chardev") {
      auto kv = keyvals(v, "backend");
      chardevs[kv["id"]] = kv;
    } else if (o == "serial") {
      serial = v;
    } else if (o == "incoming") {
      if (v != "defer") fail("-incoming {}: synthvm supports only -incoming defer", v);
      c.incoming_defer = true;
    } else if (o == "append") {
      std::istringstream in(v);
      std::string w;
      while (in >> w) {
        auto eq = w.find('=');
        if (eq == std::string::npos) continue;
        std::string k = w.substr(0, eq), val = w.substr(eq + 1);
        try {
          if (k == "synth_rate_kib_s") c.rate_kib_s = std::stod(val);
          else if (k == "synth_tick_ms") c.tick_ms = static_cast<unsigned>(std::stoul(val));
          else if (k == "synth_seed") c.seed = std::stoull(val);
        } catch (const std::exception&) {
          fail("-append: bad value in '{}'", w);
        }
      }
    } else {
      fail("option -{} {} is not supported by synthvm", o, v);
    }
  }
  if (c.backend_id.empty()) fail("no -object memory-backend-memfd,id=...,size=...,share=on: synthvm needs its RAM backend");
  if (c.machine_backend != c.backend_id)
    fail("-machine memory-backend={} does not name the memory backend '{}'", c.machine_backend, c.backend_id);
  if (c.m_size && c.m_size != c.ram_size) fail("-m {} differs from the backend size {}", c.m_size, c.ram_size);
  if (c.ram_size < 4 * kPage || c.ram_size % kPage) fail("RAM size {} must be a multiple of 4 KiB, at least 16 KiB", c.ram_size);
  if (c.qmp_path.empty()) fail("no -qmp unix:PATH,server=on,wait=off");
  if (c.tick_ms == 0) fail("synth_tick_ms must be > 0");
  if (!serial.empty() && serial != "none") {
    if (serial.rfind("chardev:", 0) != 0) fail("-serial {}: only chardev:ID is supported", serial);
    c.console_id = serial.substr(8);
    if (!chardevs.count(c.console_id)) fail("-serial {}: no -chardev with id '{}'", serial, c.console_id);
    auto& kv = chardevs[c.console_id];
    c.console_backend = kv["backend"];
    c.console_path = kv["path"];
    c.console_append = ftvm::vmm::qemu_bool(kv.count("append") ? kv["append"] : "off");
    if (c.console_backend != "socket" && c.console_backend != "file")
      fail("-chardev {}: only socket and file backends are supported", c.console_backend);
    if (c.console_path.empty()) fail("-chardev id={}: path= is required", c.console_id);
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// The machine

struct Control {  // page 0
  uint64_t magic, tick, writes, rng;
};

class Machine {
 public:
  explicit Machine(const Config& c) : cfg_(c), pages_(c.ram_size / kPage), gen_(pages_, 0) {
    ram_fd_.reset(check_sys(::memfd_create(c.backend_id.c_str(), MFD_CLOEXEC), "memfd_create for guest RAM"));
    check_sys(::ftruncate(ram_fd_.get(), static_cast<off_t>(c.ram_size)), "ftruncate guest RAM memfd");
    void* p = ::mmap(nullptr, c.ram_size, PROT_READ | PROT_WRITE, c.backend_share ? MAP_SHARED : MAP_PRIVATE,
                     ram_fd_.get(), 0);
    if (p == MAP_FAILED) throw SysError(errno, fmt::format("mmap {} bytes of guest RAM", c.ram_size));
    ram_ = static_cast<uint8_t*>(p);
  }
  ~Machine() {
    if (worker_.joinable()) {
      {
        std::lock_guard<std::mutex> g(mu_);
        quit_ = true;
        want_run_ = false;
      }
      cv_.notify_all();
      worker_.join();
    }
    ::munmap(ram_, cfg_.ram_size);
  }

  // Fresh boot: every data page at generation 1, tick 0.
  void boot() {
    for (uint64_t i = 1; i < pages_; i++) {
      fill_page(ram_ + i * kPage, i, 1);
      gen_[i] = 1;
    }
    Control ctl{kRamMagic, 0, 0, cfg_.seed};
    std::memcpy(ram_, &ctl, sizeof ctl);
    worker_ = std::thread([this] { work(); });
  }

  void start_running() {
    {
      std::lock_guard<std::mutex> g(mu_);
      want_run_ = true;
    }
    cv_.notify_all();
  }
  // Returns once the worker is parked between two page writes (vm_stop).
  void stop_running() {
    std::unique_lock<std::mutex> l(mu_);
    want_run_ = false;
    cv_.notify_all();
    cv_.wait(l, [&] { return parked_ || !worker_.joinable(); });
  }

  std::vector<uint8_t> save_blob() {  // worker parked
    Control ctl;
    std::memcpy(&ctl, ram_, sizeof ctl);
    std::vector<uint8_t> b(8 + 8 * 4 + 4 * pages_ + 8);
    uint8_t* p = b.data();
    std::memcpy(p, kBlobMagic, 8);
    uint64_t hdr[4] = {pages_, ctl.tick, ctl.writes, ctl.rng};
    std::memcpy(p + 8, hdr, sizeof hdr);
    for (uint64_t i = 0; i < pages_; i++) {
      uint32_t g = static_cast<uint32_t>(gen_[i]);
      std::memcpy(p + 40 + 4 * i, &g, 4);
    }
    uint64_t d = XXH3_64bits(p, b.size() - 8);
    std::memcpy(p + b.size() - 8, &d, 8);
    return b;
  }

  // Loads device state and checks the whole RAM against it; throws with the first difference.
  void load_blob(const std::vector<uint8_t>& b) {
    if (b.size() < 48 || std::memcmp(b.data(), kBlobMagic, 8) != 0)
      fail("device state is not a synthvm blob ({} bytes)", b.size());
    uint64_t hdr[4];
    std::memcpy(hdr, b.data() + 8, sizeof hdr);
    if (hdr[0] != pages_) fail("device state is for {} pages, this machine has {}", hdr[0], pages_);
    if (b.size() != 8 + 32 + 4 * pages_ + 8) fail("device state has {} bytes, expected {}", b.size(), 8 + 32 + 4 * pages_ + 8);
    uint64_t d;
    std::memcpy(&d, b.data() + b.size() - 8, 8);
    if (XXH3_64bits(b.data(), b.size() - 8) != d) fail("device state checksum mismatch");
    Control ctl;
    std::memcpy(&ctl, ram_, sizeof ctl);
    if (ctl.magic != kRamMagic) fail("RAM control page has no synthvm magic ({:#x})", ctl.magic);
    if (ctl.tick != hdr[1] || ctl.writes != hdr[2] || ctl.rng != hdr[3])
      fail("RAM control page (tick {}, writes {}, rng {:#x}) differs from the device state (tick {}, writes {}, rng {:#x})",
           ctl.tick, ctl.writes, ctl.rng, hdr[1], hdr[2], hdr[3]);
    uint64_t checked = 0, max_gen = 0;
    for (uint64_t i = 1; i < pages_; i++) {
      uint32_t g;
      std::memcpy(&g, b.data() + 40 + 4 * i, 4);
      auto why = check_page(ram_ + i * kPage, i, g);
      if (!why.empty()) fail("RAM differs from the checkpoint: {}", why);
      gen_[i] = g;
      checked++;
      max_gen = std::max<uint64_t>(max_gen, g);
    }
    logf(fmt::format("device state loaded: tick {}, {} writes; all {} data pages verified byte for byte (max generation {})",
                     ctl.tick, ctl.writes, checked, max_gen));
    console(fmt::format("synthvm: resumed from checkpoint at tick {} ({} pages verified)", ctl.tick, checked));
    worker_ = std::thread([this] { work(); });
  }

  // Console output (worker and main thread).
  void console(const std::string& line) {
    std::lock_guard<std::mutex> g(con_mu_);
    std::string s = line + "\r\n";
    if (con_file_) {
      write_all(con_file_.get(), s.data(), s.size(), "write console file");
    } else if (con_client_ && !send_all(con_client_.get(), s)) {
      con_client_.reset();
    }
  }
  void set_console_client(UniqueFd fd) {
    std::lock_guard<std::mutex> g(con_mu_);
    con_client_ = std::move(fd);
  }
  bool has_console_client() {
    std::lock_guard<std::mutex> g(con_mu_);
    return con_client_.valid();
  }
  int console_client_fd() {
    std::lock_guard<std::mutex> g(con_mu_);
    return con_client_.get();
  }
  void drop_console_client() {
    std::lock_guard<std::mutex> g(con_mu_);
    con_client_.reset();
  }
  void set_console_file(UniqueFd fd) { con_file_ = std::move(fd); }

  uint64_t ram_size() const { return cfg_.ram_size; }
  std::string failed() {
    std::lock_guard<std::mutex> g(mu_);
    return worker_error_;
  }

 private:
  void work() {
    try {
      Control ctl;
      std::memcpy(&ctl, ram_, sizeof ctl);
      const double pages_per_ms = cfg_.rate_kib_s / 4.0 / 1000.0;
      double budget = 0, since_tick = 0;
      auto last = Clock::now();
      bool running = false;
      for (;;) {
        if (!want_run_.load()) {
          std::unique_lock<std::mutex> l(mu_);
          if (!want_run_) {
            parked_ = true;
            cv_.notify_all();
            cv_.wait(l, [&] { return want_run_.load() || quit_; });
            parked_ = false;
            if (quit_) return;
            running = false;
          }
        }
        auto now = Clock::now();
        if (!running) {  // time spent paused does not count
          running = true;
          last = now;
        }
        double dt = std::chrono::duration<double, std::milli>(now - last).count();
        last = now;
        budget = std::min(budget + dt * pages_per_ms, 4096.0);
        since_tick += dt;
        while (budget >= 1 && want_run_.load(std::memory_order_relaxed)) {
          uint64_t i = 1 + splitmix(ctl.rng) % (pages_ - 1);
          gen_[i]++;
          fill_page(ram_ + i * kPage, i, gen_[i]);
          ctl.writes++;
          std::memcpy(ram_, &ctl, sizeof ctl);
          budget -= 1;
        }
        if (!want_run_.load()) continue;
        if (since_tick >= cfg_.tick_ms) {
          since_tick -= cfg_.tick_ms;
          if (since_tick > cfg_.tick_ms) since_tick = 0;  // do not burst after a long stall
          ctl.tick++;
          std::memcpy(ram_, &ctl, sizeof ctl);
          console(fmt::format("tick {}", ctl.tick));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> g(mu_);
      worker_error_ = e.what();
      parked_ = true;
      cv_.notify_all();
      logf(std::string("worker failed: ") + e.what());
    }
  }

  Config cfg_;
  uint64_t pages_;
  std::vector<uint64_t> gen_;
  UniqueFd ram_fd_;
  uint8_t* ram_ = nullptr;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> want_run_{false};
  bool parked_ = false, quit_ = false;
  std::string worker_error_;
  std::mutex con_mu_;
  UniqueFd con_client_, con_file_;
};

// ---------------------------------------------------------------------------------------------
// QMP server

class QmpError : public Error {
 public:
  QmpError(std::string cls, const std::string& desc) : Error(desc), cls_(std::move(cls)) {}
  const std::string& cls() const { return cls_; }

 private:
  std::string cls_;
};

[[noreturn]] void qerr(const std::string& desc) { throw QmpError("GenericError", desc); }

class Vmm {
 public:
  explicit Vmm(const Config& c) : cfg_(c), m_(c) {
    qmp_listen_ = listen_unix(c.qmp_path);
    if (c.console_backend == "socket") {
      con_listen_ = listen_unix(c.console_path);
    } else if (c.console_backend == "file") {
      int fl = O_WRONLY | O_CREAT | O_CLOEXEC | (c.console_append ? O_APPEND : O_TRUNC);
      UniqueFd f(::open(c.console_path.c_str(), fl, 0644));
      if (!f) throw SysError(errno, "open console file " + c.console_path);
      m_.set_console_file(std::move(f));
    }
    if (c.incoming_defer) {
      status_ = "inmigrate";
    } else {
      m_.boot();
      status_ = c.start_paused ? "prelaunch" : "running";
      if (status_ == "running") m_.start_running();
    }
    logf(fmt::format("{}: RAM {} MiB (memfd {}), QMP {}, state {}, rate {} KiB/s, tick {} ms", c.name,
                     c.ram_size >> 20, c.backend_id, c.qmp_path, status_, c.rate_kib_s, c.tick_ms));
  }

  int run() {
    while (!quit_) {
      std::vector<pollfd> p;
      p.push_back({client_ ? client_.get() : qmp_listen_.get(), POLLIN, 0});
      if (con_listen_) {
        int cfd = m_.console_client_fd();
        p.push_back({cfd >= 0 ? cfd : con_listen_.get(), POLLIN, 0});
      }
      int r = ::poll(p.data(), p.size(), 1000);
      if (r < 0 && errno == EINTR) continue;
      check_sys(r, "poll");
      if (p[0].revents) {
        if (client_) read_client();
        else accept_client();
      }
      if (p.size() > 1 && p[1].revents) {
        if (m_.has_console_client()) {
          char buf[256];
          ssize_t n = ::read(p[1].fd, buf, sizeof buf);  // console input is ignored
          if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) m_.drop_console_client();
        } else {
          int fd = ::accept4(con_listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
          if (fd >= 0) m_.set_console_client(UniqueFd(fd));
        }
      }
    }
    return 0;
  }

 private:
  void accept_client() {
    int fd = ::accept4(qmp_listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) return;
      throw SysError(errno, "accept on " + cfg_.qmp_path);
    }
    client_.reset(fd);
    negotiated_ = false;
    rbuf_.clear();
    pending_fds_.clear();
    json g = {{"QMP", {{"version", {{"qemu", {{"micro", 0}, {"minor", 2}, {"major", 7}}}, {"package", "synthvm"}}},
                       {"capabilities", json::array()}}}};
    send(g);
  }

  void drop_client() {
    client_.reset();
    pending_fds_.clear();
    rbuf_.clear();
  }

  void send(const json& j) {
    if (!client_) return;
    if (!send_all(client_.get(), j.dump() + "\r\n")) drop_client();
  }
  void event(const std::string& name) {
    if (!negotiated_) return;
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    send({{"event", name}, {"timestamp", {{"seconds", us / 1000000}, {"microseconds", us % 1000000}}}});
  }

  void read_client() {
    char data[65536];
    char cbuf[CMSG_SPACE(sizeof(int) * 16)];
    iovec iov{data, sizeof data};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t n = ::recvmsg(client_.get(), &mh, MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) {
      drop_client();
      return;
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t k = 0; k < nfd; k++) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof fd);
          pending_fds_.emplace_back(fd);
        }
      }
    }
    if (mh.msg_flags & MSG_CTRUNC) logf("QMP: control data truncated (too many fds passed at once)");
    rbuf_.append(data, static_cast<size_t>(n));
    // Split top-level JSON objects (one per line for QEMU clients, but any layout works).
    size_t start = 0;
    int depth = 0;
    bool in_str = false, esc = false;
    for (size_t i = 0; i < rbuf_.size() && client_; i++) {
      char ch = rbuf_[i];
      if (in_str) {
        if (esc) esc = false;
        else if (ch == '\\') esc = true;
        else if (ch == '"') in_str = false;
        continue;
      }
      if (ch == '"') in_str = true;
      else if (ch == '{' || ch == '[') depth++;
      else if (ch == '}' || ch == ']') {
        if (--depth == 0) {
          std::string msg = rbuf_.substr(start, i + 1 - start);
          start = i + 1;
          handle(msg);
          if (quit_) return;
        }
      } else if (depth == 0 && !isspace(static_cast<unsigned char>(ch))) {
        send({{"error", {{"class", "GenericError"}, {"desc", fmt::format("JSON parse error, invalid token '{}'", ch)}}}});
        start = i + 1;
      }
    }
    if (client_) rbuf_.erase(0, start);
    if (rbuf_.size() > (1 << 20)) {
      logf("QMP: request larger than 1 MiB, dropping the client");
      drop_client();
    }
  }

  void handle(const std::string& text) {
    json req;
    try {
      req = json::parse(text);
    } catch (const json::exception& e) {
      send({{"error", {{"class", "GenericError"}, {"desc", std::string("JSON parse error, ") + e.what()}}}});
      return;
    }
    json reply = json::object();
    if (req.is_object() && req.contains("id")) reply["id"] = req["id"];
    try {
      if (!req.is_object()) qerr("QMP input must be a JSON object");
      if (!req.contains("execute") || !req["execute"].is_string()) {
        if (req.contains("exec-oob")) throw QmpError("GenericError", "Out-of-band commands are not supported");
        qerr("QMP input lacks member 'execute'");
      }
      for (auto& [k, v] : req.items())
        if (k != "execute" && k != "arguments" && k != "id") qerr(fmt::format("QMP input member '{}' is unexpected", k));
      const std::string cmd = req["execute"];
      json args = req.value("arguments", json::object());
      if (!args.is_object()) qerr("QMP input member 'arguments' must be an object");
      reply["return"] = execute(cmd, args);
    } catch (const QmpError& e) {
      reply.erase("return");
      reply["error"] = {{"class", e.cls()}, {"desc", e.what()}};
    } catch (const std::exception& e) {
      reply.erase("return");
      reply["error"] = {{"class", "GenericError"}, {"desc", e.what()}};
    }
    pending_fds_.clear();  // a descriptor no command took is closed, as QEMU does
    send(reply);
    if (quit_) {
      event("SHUTDOWN");
      drop_client();
    }
  }

  static std::string str_arg(const json& a, const char* k, bool required = true) {
    if (!a.contains(k)) {
      if (required) qerr(fmt::format("Parameter '{}' is missing", k));
      return {};
    }
    if (!a[k].is_string()) qerr(fmt::format("Invalid parameter type for '{}', expected: string", k));
    return a[k].get<std::string>();
  }
  UniqueFd take_fd() {
    if (pending_fds_.empty()) qerr("No file descriptor supplied via SCM_RIGHTS");
    UniqueFd fd = std::move(pending_fds_.front());
    pending_fds_.erase(pending_fds_.begin());
    return fd;
  }
  void set_status(const std::string& s) {
    if (s != status_) logf(fmt::format("state {} -> {}", status_, s));
    status_ = s;
  }

  json execute(const std::string& cmd, const json& a) {
    if (!negotiated_) {
      if (cmd != "qmp_capabilities")
        throw QmpError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
      negotiated_ = true;
      return json::object();
    }
    if (cmd == "qmp_capabilities")
      throw QmpError("CommandNotFound", "Capabilities negotiation is already complete, command ignored");
    if (auto err = m_.failed(); !err.empty() && status_ == "running") set_status("internal-error");
    if (cmd == "query-status") return {{"status", status_}, {"running", status_ == "running"}, {"singlestep", false}};
    if (cmd == "query-name") return {{"name", cfg_.name}};
    if (cmd == "query-commands") {
      json l = json::array();
      for (auto c : {"qmp_capabilities", "query-status", "query-name", "query-commands", "query-memdev", "stop", "cont",
                     "add-fd", "remove-fd", "getfd", "closefd", "xen-save-devices-state", "migrate-incoming",
                     "query-migrate", "announce-self", "quit"})
        l.push_back({{"name", c}});
      return l;
    }
    if (cmd == "query-memdev")
      return json::array({{{"id", cfg_.backend_id}, {"size", m_.ram_size()}, {"merge", true}, {"dump", true},
                           {"prealloc", false}, {"share", cfg_.backend_share}, {"reserve", true},
                           {"host-nodes", json::array()}, {"policy", "default"}}});
    if (cmd == "stop") {
      if (status_ == "running") {
        m_.stop_running();
        set_status("paused");
        event("STOP");
      } else if (status_ == "inmigrate") {
        autostart_ = false;  // as QEMU: stays paused after the incoming migration
      }
      return json::object();
    }
    if (cmd == "cont") {
      if (status_ == "inmigrate") qerr("Migration is not finished yet; cont is not possible while waiting for an incoming migration");
      if (status_ == "internal-error") qerr("Resetting the Virtual Machine is required: " + m_.failed());
      if (!migrate_error_.empty()) qerr("incoming migration failed: " + migrate_error_);
      if (status_ != "running") {
        m_.start_running();
        set_status("running");
        event("RESUME");
      }
      return json::object();
    }
    if (cmd == "add-fd") {
      std::optional<int64_t> want;
      if (a.contains("fdset-id")) {
        if (!a["fdset-id"].is_number_integer()) qerr("Invalid parameter type for 'fdset-id', expected: integer");
        want = a["fdset-id"].get<int64_t>();
        if (*want < 0) qerr("Parameter 'fdset-id' expects a non-negative value");
      }
      std::string opaque = str_arg(a, "opaque", false);
      UniqueFd fd = take_fd();
      int64_t id = 0;
      if (want) id = *want;
      else
        while (fdsets_.count(id)) id++;
      int num = fd.get();
      fdsets_[id].push_back({std::move(fd), opaque});
      return {{"fdset-id", id}, {"fd", num}};
    }
    if (cmd == "remove-fd") {
      if (!a.contains("fdset-id") || !a["fdset-id"].is_number_integer()) qerr("Parameter 'fdset-id' is missing");
      int64_t id = a["fdset-id"];
      auto it = fdsets_.find(id);
      if (it == fdsets_.end()) qerr(fmt::format("File descriptor named 'fdset-id:{}' not found", id));
      if (a.contains("fd")) {
        int fd = a["fd"].get<int>();
        auto& v = it->second;
        auto f = std::find_if(v.begin(), v.end(), [&](auto& e) { return e.first.get() == fd; });
        if (f == v.end()) qerr(fmt::format("File descriptor named 'fdset-id:{}, fd:{}' not found", id, fd));
        v.erase(f);
        if (v.empty()) fdsets_.erase(it);
      } else {
        fdsets_.erase(it);
      }
      return json::object();
    }
    if (cmd == "getfd") {
      std::string name = str_arg(a, "fdname");
      if (name.empty() || isdigit(static_cast<unsigned char>(name[0])))
        qerr("Parameter 'fdname' expects a name not starting with a digit");
      named_fds_[name] = take_fd();
      return json::object();
    }
    if (cmd == "closefd") {
      std::string name = str_arg(a, "fdname");
      if (!named_fds_.erase(name)) qerr(fmt::format("File descriptor named '{}' not found", name));
      return json::object();
    }
    if (cmd == "xen-save-devices-state") {
      std::string fn = str_arg(a, "filename");
      if (a.contains("live") && !a["live"].is_boolean()) qerr("Invalid parameter type for 'live', expected: boolean");
      if (status_ == "inmigrate") qerr("The VM has no state to save while waiting for an incoming migration");
      UniqueFd out = open_for_write(fn);
      const bool was_running = status_ == "running";
      if (was_running) m_.stop_running();
      std::vector<uint8_t> blob;
      try {
        blob = m_.save_blob();
      } catch (...) {
        if (was_running) m_.start_running();
        throw;
      }
      if (was_running) m_.start_running();
      write_all(out.get(), blob.data(), blob.size(), "write device state to " + fn);
      return json::object();
    }
    if (cmd == "migrate-incoming") {
      std::string uri = str_arg(a, "uri");
      if (!cfg_.incoming_defer || status_ != "inmigrate" || migrated_)
        qerr("The incoming migration has already been started");
      if (uri.rfind("fd:", 0) != 0) qerr(fmt::format("unknown migration protocol: {} (synthvm: fd:NAME only)", uri));
      std::string name = uri.substr(3);
      auto it = named_fds_.find(name);
      if (it == named_fds_.end()) qerr(fmt::format("File descriptor named '{}' has not been found", name));
      UniqueFd in = std::move(it->second);
      named_fds_.erase(it);
      migrated_ = true;
      migrate_status_ = "active";
      try {
        std::vector<uint8_t> blob;
        uint8_t buf[65536];
        for (;;) {
          ssize_t n = ::read(in.get(), buf, sizeof buf);
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) throw SysError(errno, "read incoming device state from fd " + name);
          if (n == 0) break;
          blob.insert(blob.end(), buf, buf + n);
        }
        m_.load_blob(blob);
        migrate_status_ = "completed";
        if (autostart_ && !cfg_.start_paused) {
          m_.start_running();
          set_status("running");
          event("RESUME");
        } else {
          set_status("paused");
        }
      } catch (const std::exception& e) {
        migrate_status_ = "failed";
        migrate_error_ = e.what();
        logf(std::string("SYNTH BAD: incoming migration failed: ") + e.what());
        m_.console(std::string("SYNTH BAD: ") + e.what());
      }
      return json::object();
    }
    if (cmd == "query-migrate") {
      if (migrate_status_.empty()) return json::object();
      json r = {{"status", migrate_status_}};
      if (!migrate_error_.empty()) r["error-desc"] = migrate_error_;
      return r;
    }
    if (cmd == "announce-self") return json::object();
    if (cmd == "quit") {
      quit_ = true;
      return json::object();
    }
    throw QmpError("CommandNotFound", fmt::format("The command {} has not been found", cmd));
  }

  // QEMU's qemu_open() for a migration/save target: /dev/fdset/N dups the set's descriptor
  // whose access mode is O_WRONLY and truncates the file (the dup shares the file offset).
  UniqueFd open_for_write(const std::string& fn) {
    if (fn.rfind("/dev/fdset/", 0) == 0) {
      int64_t id;
      try {
        id = std::stoll(fn.substr(11));
      } catch (const std::exception&) {
        qerr(fmt::format("Could not open '{}': Invalid argument", fn));
      }
      auto it = fdsets_.find(id);
      if (it == fdsets_.end()) qerr(fmt::format("Could not open '{}': No such file or directory", fn));
      for (auto& [fd, opaque] : it->second) {
        int fl = check_sys(::fcntl(fd.get(), F_GETFL), "fcntl F_GETFL on fdset descriptor");
        if ((fl & O_ACCMODE) != O_WRONLY) continue;
        UniqueFd d(check_sys(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0), "dup fdset descriptor"));
        check_sys(::ftruncate(d.get(), 0), "ftruncate " + fn);
        return d;
      }
      qerr(fmt::format("Could not open '{}': Permission denied (no write-only descriptor in the set)", fn));
    }
    UniqueFd f(::open(fn.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0660));
    if (!f) qerr(fmt::format("Could not open '{}': {}", fn, std::strerror(errno)));
    return f;
  }

  Config cfg_;
  Machine m_;
  UniqueFd qmp_listen_, client_, con_listen_;
  bool negotiated_ = false, quit_ = false, migrated_ = false, autostart_ = true;
  std::string status_, migrate_status_, migrate_error_, rbuf_;
  std::vector<UniqueFd> pending_fds_;
  std::map<int64_t, std::vector<std::pair<UniqueFd, std::string>>> fdsets_;
  std::map<std::string, UniqueFd> named_fds_;
};

// ---------------------------------------------------------------------------------------------
// Test helpers

// Copies console lines from a unix socket to OUT as "WALL_MS LINE". Without FOLLOW it stops at
// the first EOF. With FOLLOW it connects again after every EOF (a standby may destroy a twin that
// never got a committed checkpoint and start a new one on the same socket path when the primary
// retries) and runs until it is killed; it gives up only when no socket accepts for 120 s.
int tool_console(const std::string& sock, const std::string& out, bool follow) {
  UniqueFd f(::open(out.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!f) throw SysError(errno, "open " + out);
  sockaddr_un a{};
  if (sock.size() >= sizeof a.sun_path) fail("socket path too long: {}", sock);
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, sock.c_str(), sock.size());
  for (;;) {
    UniqueFd s;
    auto t0 = Clock::now();
    for (;;) {
      s.reset(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket"));
      if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) break;
      if (errno != ENOENT && errno != ECONNREFUSED) throw SysError(errno, "connect " + sock);
      if (Clock::now() - t0 > std::chrono::seconds(120)) fail("console socket {} never accepted", sock);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::string buf;
    char data[4096];
    for (;;) {
      ssize_t n = ::read(s.get(), data, sizeof data);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      buf.append(data, static_cast<size_t>(n));
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        std::string line = buf.substr(0, nl);
        buf.erase(0, nl + 1);
        if (!line.empty() && line.back() == '\r') line.pop_back();
        std::string rec = fmt::format("{:.3f} {}\n", wall_ms(), line);
        write_all(f.get(), rec.data(), rec.size(), "write " + out);
      }
    }
    if (!follow) return 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

struct Tick {
  double ms;
  uint64_t n;
};
std::vector<Tick> read_ticks(const std::string& path, std::vector<std::string>* lines = nullptr) {
  std::ifstream in(path);
  if (!in) fail("cannot read console log {}", path);
  std::vector<Tick> t;
  std::string l;
  while (std::getline(in, l)) {
    std::istringstream s(l);
    double ms;
    std::string w;
    uint64_t n;
    if (!(s >> ms)) continue;
    std::string rest;
    std::getline(s, rest);
    if (lines) lines->push_back(rest);
    std::istringstream r(rest);
    if (r >> w >> n && w == "tick") t.push_back({ms, n});
  }
  return t;
}

// check-failover --status STATUS.json --vm NAME --twin-console LOG [--primary-console LOG]
//                [--epochs EPOCHS.jsonl] [--min-epoch N]
int tool_check_failover(const std::vector<std::string>& args) {
  std::map<std::string, std::string> o;
  for (size_t i = 0; i + 1 < args.size(); i += 2) o[args[i]] = args[i + 1];
  if (!o.count("--status") || !o.count("--vm") || !o.count("--twin-console"))
    fail("check-failover needs --status FILE --vm NAME --twin-console LOG");
  std::ifstream sf(o["--status"]);
  if (!sf) fail("cannot read {}", o["--status"]);
  json st = json::parse(sf);
  json vm;
  for (auto& v : st)
    if (v.value("name", "") == o["--vm"] && v.value("role", "").rfind("active", 0) == 0) vm = v;
  if (vm.is_null()) fail("no active VM '{}' in the standby's status: {}", o["--vm"], st.dump());
  if (vm.value("state", "") != "active") fail("standby state is '{}', not active: {}", vm.value("state", ""), vm.dump());
  json act = vm["activation"];
  fmt::print("activation: {}\n", act.dump());
  if (act.value("status_after", "") != "running") fail("twin not running after activation");
  if (!act.contains("ram_digest") || act["ram_digest"] != act["expected_ram_digest"])
    fail("twin RAM digest {} != the primary's digest {} of epoch {}", act.value("ram_digest", "?"),
         act.value("expected_ram_digest", "?"), act.value("epoch", 0));
  if (!act.value("executing", false)) fail("the twin is not executing after activation (RAM unchanged)");
  const uint64_t epoch = act.value("epoch", uint64_t{0});
  if (o.count("--min-epoch") && epoch < std::stoull(o["--min-epoch"]))
    fail("activated from epoch {}, expected at least {}", epoch, o["--min-epoch"]);

  std::vector<std::string> tl;
  auto tt = read_ticks(o["--twin-console"], &tl);
  for (auto& l : tl)
    if (l.find("SYNTH BAD") != std::string::npos) fail("twin reported: {}", l);
  bool resumed = false;
  for (auto& l : tl) resumed |= l.find("resumed from checkpoint") != std::string::npos;
  if (!resumed) fail("twin console has no 'resumed from checkpoint' line");
  if (tt.size() < 5) fail("twin printed only {} ticks", tt.size());
  for (size_t i = 1; i < tt.size(); i++)
    if (tt[i].n != tt[i - 1].n + 1) fail("twin ticks not consecutive: {} then {}", tt[i - 1].n, tt[i].n);
  fmt::print("twin: first tick {}, {} ticks, consecutive\n", tt[0].n, tt.size());
  if (o.count("--primary-console")) {
    auto pt = read_ticks(o["--primary-console"]);
    if (pt.empty()) fail("primary printed no ticks");
    double cut = 0;
    if (o.count("--epochs")) {
      std::ifstream ef(o["--epochs"]);
      std::string l;
      uint64_t best = 0;
      while (std::getline(ef, l)) {
        if (l.empty()) continue;
        auto r = json::parse(l);
        uint64_t e = r.value("epoch", uint64_t{0});
        if (e == epoch) {
          if (r.value("ram_digest", "") != act.value("ram_digest", ""))
            fail("primary recorded digest {} for epoch {}, twin has {}", r.value("ram_digest", ""), e,
                 act.value("ram_digest", ""));
          cut = r.value("wall_ms", 0.0);
          best = e;
        } else if (e < epoch && e > best && cut == 0) {
          best = e;
          cut = r.value("wall_ms", 0.0);
        }
      }
    }
    uint64_t floor = 0;
    for (auto& t : pt)
      if (t.ms < cut) floor = t.n + 1;
    const uint64_t last = pt.back().n;
    fmt::print("continuity: primary last tick {}, floor from the committed cut {}, twin first tick {}\n", last, floor,
               tt[0].n);
    if (tt[0].n < floor || tt[0].n > last + 1)
      fail("twin resumed at tick {}, expected within [{}, {}]", tt[0].n, floor, last + 1);
  }
  fmt::print("check-failover: OK\n");
  return 0;
}

// scan-ram PID: every data page of synthvm process PID is a valid page (index, checksum, content);
// a page that fails is re-read a few times (ftd may be copying it right now). Prints a summary.
int tool_scan_ram(pid_t pid) {
  auto argv = ftvm::vmm::read_cmdline(pid);
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  Config c = parse_cmdline(static_cast<int>(cargv.size()), cargv.data());
  auto gr = ftvm::vmm::find_guest_ram(pid, c.ram_size);
  ftvm::vmm::MappedRam ram(pid, gr, ftvm::vmm::MappedRam::Access::ReadOnly);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(ram.data());
  uint64_t pages = c.ram_size / kPage, max_gen = 0, sum_gen = 0, zero = 0;
  for (uint64_t i = 1; i < pages; i++) {
    std::string why;
    uint64_t g = 0;
    for (int attempt = 0; attempt < 20; attempt++) {
      uint8_t copy[kPage];
      std::memcpy(copy, p + i * kPage, kPage);
      uint64_t h[2];
      std::memcpy(h, copy, sizeof h);
      if (h[0] == 0 && h[1] == 0) {  // a twin whose RAM is not synced yet
        why.clear();
        g = 0;
        zero++;
        break;
      }
      why = check_page(copy, i, 0, &g);
      if (why.empty()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (!why.empty()) fail("process {}: {}", pid, why);
    max_gen = std::max(max_gen, g);
    sum_gen += g;
  }
  Control ctl;
  std::memcpy(&ctl, p, sizeof ctl);
  fmt::print("scan-ram pid {}: {} data pages valid ({} not yet written), generation sum {} max {}, tick {}\n", pid,
             pages - 1, zero, sum_gen, max_gen, ctl.tick);
  return 0;
}

void usage() {
  fmt::print(stderr,
             "usage: synthvm -name N -m SIZE -machine memory-backend=mem0 -object "
             "memory-backend-memfd,id=mem0,size=SIZE,share=on\n"
             "               -qmp unix:PATH,server=on,wait=off [-chardev socket,id=ser0,path=P,server=on,wait=off "
             "-serial chardev:ser0]\n"
             "               [-S] [-incoming defer] [-append 'synth_rate_kib_s=N synth_tick_ms=N synth_seed=N']\n"
             "       synthvm --tool console SOCK OUT [--follow]\n"
             "       synthvm --tool check-failover --status FILE --vm NAME --twin-console LOG [--primary-console LOG] "
             "[--epochs FILE] [--min-epoch N]\n"
             "       synthvm --tool scan-ram PID\n");
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  try {
    if (argc >= 2 && std::string(argv[1]) == "--tool") {
      std::vector<std::string> a(argv + 2, argv + argc);
      if (a.size() == 3 && a[0] == "console") return tool_console(a[1], a[2], false);
      if (a.size() == 4 && a[0] == "console" && a[3] == "--follow") return tool_console(a[1], a[2], true);
      if (!a.empty() && a[0] == "check-failover") return tool_check_failover({a.begin() + 1, a.end()});
      if (a.size() == 2 && a[0] == "scan-ram") return tool_scan_ram(static_cast<pid_t>(std::stol(a[1])));
      usage();
      return 2;
    }
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
      usage();
      return 2;
    }
    Config c = parse_cmdline(argc, argv);
    Vmm vmm(c);
    return vmm.run();
  } catch (const std::exception& e) {
    fmt::print(stderr, "synthvm: {}\n", e.what());
    return 1;
  }
}
