// Transport microbenchmark (issue 3): RDMA vs TCP through the Connection interface, with the
// shape of a checkpoint epoch. Not a test: it prints numbers; see docs/BENCHMARKS.md
// ("Transport microbenchmark (RDMA vs TCP)") and bench/run-transport-bench.sh.
//
// One process, two threads per backend: a receiver (the standby's role) that registers a
// region and answers every Commit with an Ack, and a sender (the primary's role) that runs
// epochs back to back. One epoch =
//   * N one-sided 4 KiB writes from a source buffer ("guest RAM"; registered with
//     register_source() on RDMA, so zero-copy) into the receiver's region, either at scattered
//     page offsets (layout "scattered": N writes, a distinct pseudo-random page each) or as one
//     contiguous write of N pages (layout "staged": what ftd does with its staging buffer),
//   * a Commit control message (epoch number, pages, seed),
//   * the receiver checks a sample of the pages (each page carries a stamp of its epoch in its
//     first 8 bytes) and sends an Ack control message back,
//   * the sender waits for the Ack.
// Per epoch it records write-issue time (start -> all writes queued), commit->ack (from
// issuing the Commit, i.e. after the last write() returned, to receiving the Ack),
// sent->ack (from send_control() returning to the Ack) and epoch time (start -> Ack). Which
// of these holds the data transfer depends on the backend: RDMA write() returns once work
// requests are posted (the send queue has 128 slots), TCP write() pushes into the socket when
// its queue is large; only the epoch time compares like with like. The write rate is
// payload bytes / the sum of epoch times (epochs run back to back, so it includes the commit
// round trip, as replication does).
//
// Output: a human summary on stdout, and the JSON result between the lines
// "@@TRANSPORT_BENCH_JSON_BEGIN@@" and "@@TRANSPORT_BENCH_JSON_END@@" (the RDMA lab returns only
// the guest console, so the runner extracts it from there); --json FILE also writes it to a file.
#include <fmt/format.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sodium.h>

#include "checkpoint/digest.h"
#include "common/error.h"
#include "transport/auth.h"
#include "transport/tcp/tcp_transport.h"
#include "transport/transport.h"
#ifdef FTVM_HAVE_RDMA
#include "transport/rdma/rdma_transport.h"
#endif

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using ftvm::transport::Connection;
using json = nlohmann::json;

constexpr size_t kPage = 4096;
constexpr uint32_t kRegion = 1;
enum Msg : uint16_t { kReady = 1, kCommit = 2, kAck = 3, kDone = 4 };

struct Config {
  std::vector<std::string> backends;
  std::string addr;
  std::vector<uint32_t> batches{64, 512, 4096};
  std::vector<std::string> layouts{"scattered", "staged"};
  size_t region_mib = 64;
  double seconds = 2.0;
  uint32_t min_epochs = 10, max_epochs = 20000, warmup = 3;
  bool zero_copy = true;
  std::vector<double> dirty_mb_s{10, 100, 1000};
  double epoch_ms = 25;
  double fixed_us = 50;
  double devstate_bytes = 32709;  // measured device state of the test guest (docs/BENCHMARKS.md)
  std::string json_path;
};

// ---- wire bodies -----------------------------------------------------------------------------

struct CommitBody {
  uint64_t epoch;
  uint64_t seed;
  uint32_t pages;
  uint32_t staged;  // 1: contiguous pages at offset 0
};
struct AckBody {
  uint64_t epoch;
  uint32_t ok;
  uint32_t pad;
};

template <typename T>
std::span<const std::byte> as_bytes(const T& t) {
  return {reinterpret_cast<const std::byte*>(&t), sizeof t};
}
template <typename T>
T from_bytes(const std::vector<std::byte>& b) {
  T t{};
  if (b.size() != sizeof t) throw ftvm::ProtocolError(fmt::format("body of {} bytes, expected {}", b.size(), sizeof t));
  std::memcpy(&t, b.data(), sizeof t);
  return t;
}

// Page i of epoch (seed): a distinct page of the region for every i < npages (odd stride over a
// power-of-two page count is a permutation), spread over the whole region.
struct PageSeq {
  uint64_t start, stride, mask;
  PageSeq(uint64_t seed, uint64_t region_pages) : mask(region_pages - 1) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull;
    x ^= x >> 31;
    start = x & mask;
    stride = ((x >> 17) | 1) & mask;
    stride |= 1;
  }
  uint64_t operator()(uint64_t i) const { return (start + i * stride) & mask; }
};

uint64_t stamp_of(uint64_t epoch, uint64_t i) { return (epoch << 32) ^ (i * 0x100000001b3ull) ^ 0xA5A5; }

// ---- stats -----------------------------------------------------------------------------------

double pct(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  double r = p / 100.0 * double(v.size() - 1);
  size_t lo = size_t(std::floor(r)), hi = size_t(std::ceil(r));
  return v[lo] + (v[hi] - v[lo]) * (r - double(lo));
}
json dist(const std::vector<double>& v) {
  if (v.empty()) return json{{"n", 0}};
  double sum = 0;
  for (double x : v) sum += x;
  return json{{"n", v.size()},
              {"mean", sum / double(v.size())},
              {"p50", pct(v, 50)},
              {"p99", pct(v, 99)},
              {"min", *std::min_element(v.begin(), v.end())},
              {"max", *std::max_element(v.begin(), v.end())}};
}
double us_since(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// ---- one backend -----------------------------------------------------------------------------

struct Pair {
  std::unique_ptr<Connection> sender;
  std::thread receiver;
  std::exception_ptr receiver_error;
  std::atomic<uint64_t> verify_errors{0};
  std::string device;
};

// The receiver: registers the region, says Ready, then answers Commits until Done.
void receive_loop(Pair* p, std::unique_ptr<Connection> c, std::span<std::byte> region, size_t region_pages) {
  try {
    c->register_region(kRegion, region);
    c->send_control(kReady, {});
    for (;;) {
      auto m = c->poll(1000ms);
      if (!m) continue;
      if (m->type == kDone) break;
      if (m->type != kCommit) throw ftvm::ProtocolError(fmt::format("receiver: unexpected message {}", m->type));
      auto cb = from_bytes<CommitBody>(m->body);
      PageSeq seq(cb.seed, region_pages);
      uint32_t bad = 0;
      // Sample: the first and last 8 pages of the epoch.
      for (uint64_t i = 0; i < cb.pages; ++i) {
        if (i == 8 && cb.pages > 16) i = cb.pages - 8;
        uint64_t page = cb.staged ? i : seq(i);
        uint64_t got;
        std::memcpy(&got, region.data() + page * kPage, sizeof got);
        if (got != stamp_of(cb.epoch, i)) ++bad;
      }
      if (bad) p->verify_errors += bad;
      AckBody ab{cb.epoch, bad == 0, 0};
      c->send_control(kAck, as_bytes(ab));
    }
    // Let the sender see everything before the connection goes away.
    auto end = Clock::now() + 2s;
    while (Clock::now() < end) {
      try {
        if (c->poll(100ms)) continue;
      } catch (const ftvm::LinkDown&) {
        break;
      }
    }
  } catch (...) {
    p->receiver_error = std::current_exception();
  }
}

// A throwaway key for the authenticated TCP backends (created 0600 in a private temp dir, read
// back, removed).
std::shared_ptr<const ftvm::transport::auth::Key> bench_key() {
  static std::shared_ptr<const ftvm::transport::auth::Key> k = [] {
    char dir[] = "/tmp/ftvm-bench-key.XXXXXX";
    if (!::mkdtemp(dir)) throw ftvm::SysError(errno, "mkdtemp for the benchmark key");
    std::string path = std::string(dir) + "/peer.key";
    ftvm::transport::auth::generate_key(path);
    auto key = ftvm::transport::auth::load_key(path);
    ::unlink(path.c_str());
    ::rmdir(dir);
    return key;
  }();
  return k;
}

std::unique_ptr<Pair> make_pair(const std::string& backend, const Config& cfg, std::span<std::byte> region,
                                size_t region_pages) {
  auto p = std::make_unique<Pair>();
  ftvm::transport::Options o;
  o.connect_timeout = 10s;
  std::unique_ptr<Connection> server;
  if (backend == "tcp" || backend == "tcp+auth" || backend == "tcp+encrypt") {
    // tcp+auth: authenticated (handshake, a Poly1305 tag per frame, payloads copied while
    // tagging); tcp+encrypt: also ChaCha20 payloads (issue 12). Same socket path otherwise.
    if (backend != "tcp") o.key = bench_key();
    o.encrypt = backend == "tcp+encrypt";
    ftvm::transport::tcp::Listener l(cfg.addr, 0, o);
    std::thread t([&] { server = l.accept(20s); });
    p->sender = ftvm::transport::tcp::connect_tcp(cfg.addr, l.bound_port(), o);
    t.join();
    p->device = p->sender->security();
#ifdef FTVM_HAVE_RDMA
  } else if (backend == "rdma") {
    std::string dev;
    if (!ftvm::transport::rdma::rdma_reachable(cfg.addr, &dev))
      throw ftvm::Error(fmt::format("{} does not resolve through an RDMA device", cfg.addr));
    ftvm::transport::rdma::RdmaListener l(cfg.addr, 0, o);
    std::exception_ptr acc_err;
    std::thread t([&] {
      try {
        server = l.accept(20s);
      } catch (...) {
        acc_err = std::current_exception();
      }
    });
    p->sender = ftvm::transport::rdma::connect_rdma(cfg.addr, l.bound_port(), o);
    t.join();
    if (acc_err) std::rethrow_exception(acc_err);
    p->device = static_cast<ftvm::transport::rdma::RdmaConnection*>(p->sender.get())->device_name();
#endif
  } else {
    throw ftvm::Error(fmt::format("backend '{}' not available in this build (tcp{})", backend,
#ifdef FTVM_HAVE_RDMA
                                  ", rdma"
#else
                                  ""
#endif
                                  ));
  }
  if (!server) throw ftvm::Error(fmt::format("{}: the listener accepted nothing within 20 s", backend));
  p->receiver = std::thread(receive_loop, p.get(), std::move(server), region, region_pages);
  // Wait for Ready (the region is registered/advertised).
  auto deadline = Clock::now() + 20s;
  for (;;) {
    if (auto m = p->sender->poll(200ms)) {
      if (m->type != kReady) throw ftvm::ProtocolError("sender: expected Ready");
      break;
    }
    if (p->receiver_error) std::rethrow_exception(p->receiver_error);
    if (Clock::now() > deadline) throw ftvm::Error("no Ready from the receiver within 20 s");
  }
  return p;
}

json run_config(Pair& p, std::span<std::byte> src, size_t region_pages, uint32_t npages, bool staged,
                const Config& cfg, uint64_t& epoch_no) {
  std::vector<double> issue_us, commit_ack_us, sent_ack_us, epoch_us, send_ctl_us;
  uint64_t pages_total = 0;
  double busy_us = 0;
  auto t_begin = Clock::now();
  uint32_t measured = 0;
  for (uint32_t k = 0;; ++k) {
    bool warm = k < cfg.warmup;
    if (!warm) {
      double el = us_since(t_begin, Clock::now()) / 1e6;
      if (measured >= cfg.max_epochs) break;
      if (measured >= cfg.min_epochs && el >= cfg.seconds) break;
    }
    uint64_t epoch = ++epoch_no;
    uint64_t seed = epoch * 7919 + npages;
    PageSeq seq(seed, region_pages);
    // "Dirty" the pages: stamp each with its epoch (outside the timed part).
    for (uint64_t i = 0; i < npages; ++i) {
      uint64_t page = staged ? i : seq(i);
      uint64_t s = stamp_of(epoch, i);
      std::memcpy(src.data() + page * kPage, &s, sizeof s);
    }
    auto t0 = Clock::now();
    if (staged) {
      p.sender->write(kRegion, 0, src.subspan(0, size_t(npages) * kPage));
    } else {
      for (uint64_t i = 0; i < npages; ++i) {
        uint64_t off = seq(i) * kPage;
        p.sender->write(kRegion, off, src.subspan(off, kPage));
      }
    }
    auto t1 = Clock::now();
    CommitBody cb{epoch, seed, npages, staged ? 1u : 0u};
    p.sender->send_control(kCommit, as_bytes(cb));
    auto t2 = Clock::now();
    std::optional<ftvm::transport::ControlMessage> m;
    while (!(m = p.sender->poll(1000ms))) {
      if (p.receiver_error) std::rethrow_exception(p.receiver_error);
    }
    auto t3 = Clock::now();
    if (m->type != kAck) throw ftvm::ProtocolError("sender: expected Ack");
    auto ab = from_bytes<AckBody>(m->body);
    if (ab.epoch != epoch) throw ftvm::ProtocolError(fmt::format("Ack for epoch {}, expected {}", ab.epoch, epoch));
    if (warm) {
      t_begin = Clock::now();
      continue;
    }
    ++measured;
    issue_us.push_back(us_since(t0, t1));
    send_ctl_us.push_back(us_since(t1, t2));
    commit_ack_us.push_back(us_since(t1, t3));
    sent_ack_us.push_back(us_since(t2, t3));
    epoch_us.push_back(us_since(t0, t3));
    busy_us += us_since(t0, t3);
    pages_total += npages;
  }
  double bytes = double(pages_total) * kPage;
  double secs = busy_us / 1e6;
  json r;
  r["pages_per_epoch"] = npages;
  r["layout"] = staged ? "staged" : "scattered";
  r["epochs"] = measured;
  r["bytes"] = bytes;
  r["mib_s"] = bytes / (1 << 20) / secs;
  r["pages_s"] = double(pages_total) / secs;
  r["write_issue_us"] = dist(issue_us);
  r["send_control_us"] = dist(send_ctl_us);
  r["commit_ack_us"] = dist(commit_ack_us);
  r["sent_ack_us"] = dist(sent_ack_us);
  r["epoch_us"] = dist(epoch_us);
  return r;
}

json run_backend(const std::string& backend, const Config& cfg) {
  size_t region_pages = cfg.region_mib * (1 << 20) / kPage;
  if (region_pages & (region_pages - 1)) throw ftvm::Error("--region-mib must be a power of two");
  for (auto b : cfg.batches)
    if (b > region_pages) throw ftvm::Error(fmt::format("batch {} > region pages {}", b, region_pages));
  std::vector<std::byte> region(region_pages * kPage, std::byte{0});
  std::vector<std::byte> src(region_pages * kPage, std::byte{0x5a});
  auto p = make_pair(backend, cfg, region, region_pages);
  json out;
  out["backend"] = backend;
  out["device"] = p->device;
  out["peer"] = p->sender->peer();
  bool zc = false;
#ifdef FTVM_HAVE_RDMA
  if (backend == "rdma" && cfg.zero_copy) {
    static_cast<ftvm::transport::rdma::RdmaConnection*>(p->sender.get())->register_source(src);
    zc = true;
  }
#endif
  out["zero_copy_source"] = zc;
  uint64_t epoch_no = 0;
  json results = json::array();
  std::exception_ptr err;
  try {
    for (auto& layout : cfg.layouts)
      for (auto b : cfg.batches) {
        auto r = run_config(*p, src, region_pages, b, layout == "staged", cfg, epoch_no);
        fmt::print("  {:5} {:9} {:5} pages/epoch: {:8.1f} MiB/s {:9.0f} pages/s  commit->ack p50 {:8.0f} p99 {:8.0f} us  "
                   "epoch p50 {:8.0f} p99 {:8.0f} us  (n={})\n",
                   backend, layout, b, r["mib_s"].get<double>(), r["pages_s"].get<double>(),
                   r["commit_ack_us"]["p50"].get<double>(), r["commit_ack_us"]["p99"].get<double>(),
                   r["epoch_us"]["p50"].get<double>(), r["epoch_us"]["p99"].get<double>(), r["epochs"].get<int>());
        std::fflush(stdout);
        results.push_back(std::move(r));
      }
    p->sender->send_control(kDone, {});
    p->sender->flush();
  } catch (...) {
    err = std::current_exception();
  }
  if (err) {
    p->sender.reset();  // the receiver sees LinkDown and ends
    p->receiver.join();
    std::rethrow_exception(err);
  }
  p->receiver.join();
  if (p->receiver_error) std::rethrow_exception(p->receiver_error);
  out["bytes_sent"] = p->sender->bytes_sent();
  out["verify_errors"] = p->verify_errors.load();
  out["results"] = std::move(results);
  return out;
}

// ---- raw cost of the authentication primitives (issue 12) ---------------------------------------

// One core, no sockets: how fast this CPU tags (Poly1305 keyed per frame, as auth::Direction
// does for every frame), copies (what the authenticated sender does with each Write payload)
// and encrypts (ChaCha20) 1 MiB frames. Puts the tcp+auth/tcp+encrypt numbers in proportion.
json primitive_costs() {
  ftvm::transport::auth::init();  // sodium_init: picks the CPU's fastest implementations
  std::vector<std::byte> a(1u << 20, std::byte{0x5a}), b(a.size());
  std::array<unsigned char, 32> key{};
  key[0] = 1;
  ftvm::transport::auth::Direction d(key, true);
  auto rate = [&](const char* name, auto&& fn) {
    for (int i = 0; i < 8; ++i) fn();  // warm up
    int n = 0;
    auto t0 = Clock::now();
    while (Clock::now() - t0 < 500ms) {
      fn();
      ++n;
    }
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    double mib_s = n * (a.size() / double(1 << 20)) / s;
    fmt::print("  {:34} {:8.0f} MiB/s per core\n", name, mib_s);
    return mib_s;
  };
  fmt::print("authentication primitives (one core, 1 MiB frames):\n");
  json out;
  out["memcpy_mib_s"] = rate("memcpy (sender's copy)", [&] { std::memcpy(b.data(), a.data(), a.size()); });
  out["poly1305_tag_mib_s"] = rate("Poly1305 tag (per-frame key)", [&] {
    d.begin();
    d.update(a.data(), a.size());
    (void)d.finish();
  });
  out["copy_and_tag_mib_s"] = rate("copy + Poly1305 (auth sender)", [&] {
    d.begin();
    std::memcpy(b.data(), a.data(), a.size());
    d.update(b.data(), b.size());
    (void)d.finish();
  });
  out["chacha20_poly1305_mib_s"] = rate("ChaCha20 + Poly1305 (encrypt)", [&] {
    d.begin();
    d.crypt(b.data(), a.data(), a.size());
    d.update(b.data(), b.size());
    (void)d.finish();
  });
  // The Commit's digest over the staged epoch (checkpoint/digest.h): XXH3 on unauthenticated
  // sessions, the keyed Poly1305 tag (per-epoch key, what authenticated sessions use) and,
  // for the choice documented in transport/auth.h, keyed BLAKE2b (crypto_generichash).
  ftvm::checkpoint::EpochKey ek{};
  ek[3] = 7;
  uint64_t ep = 0;
  volatile uint64_t sink = 0;
  out["xxh3_digest_mib_s"] = rate("XXH3 epoch digest (--insecure)", [&] { sink = ftvm::checkpoint::digest_bytes(a); });
  out["keyed_poly1305_digest_mib_s"] = rate("keyed epoch digest (Poly1305)", [&] {
    auto t = ftvm::checkpoint::staged_tag(ek, ++ep, a);
    sink = static_cast<uint64_t>(t[0]);
  });
  out["keyed_blake2b_digest_mib_s"] = rate("keyed BLAKE2b-128 (alternative)", [&] {
    unsigned char t[16];
    crypto_generichash(t, sizeof t, reinterpret_cast<const unsigned char*>(a.data()), a.size(), ek.data(), ek.size());
    sink = t[0];
  });
  // Per epoch: the digest of one staged epoch of N pages (ftd's layout: 8-byte index + page).
  fmt::print("epoch digest per staged epoch (one core):\n");
  json per_epoch = json::array();
  for (size_t pages : {64u, 512u, 4096u}) {
    std::vector<std::byte> e(pages * (8 + 4096), std::byte{0x33});
    auto us = [&](auto&& fn) {
      for (int i = 0; i < 4; ++i) fn();
      int n = 0;
      auto t0 = Clock::now();
      while (Clock::now() - t0 < 300ms) {
        fn();
        ++n;
      }
      return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / n;
    };
    double x = us([&] { sink = ftvm::checkpoint::digest_bytes(e); });
    double k = us([&] { sink = static_cast<uint64_t>(ftvm::checkpoint::staged_tag(ek, ++ep, e)[0]); });
    fmt::print("  {:5} pages ({:6.2f} MiB): XXH3 {:8.1f} us, keyed Poly1305 {:8.1f} us\n", pages,
               e.size() / double(1 << 20), x, k);
    per_epoch.push_back({{"pages", pages}, {"bytes", e.size()}, {"xxh3_us", x}, {"keyed_poly1305_us", k}});
  }
  out["epoch_digest"] = per_epoch;
  return out;
}

// ---- what the design needs on real links -----------------------------------------------------

json design_table(const Config& cfg, const json& backends) {
  json rows = json::array();
  const double epoch_s = cfg.epoch_ms / 1000.0;
  // This run's sustained rate at the largest scattered batch, per backend (in the lab: functional only).
  std::vector<std::pair<std::string, double>> lab;
  for (auto& b : backends) {
    double best = 0;
    uint32_t best_batch = 0;
    for (auto& r : b["results"])
      if (r["layout"] == "scattered" && r["pages_per_epoch"].get<uint32_t>() >= best_batch) {
        best_batch = r["pages_per_epoch"].get<uint32_t>();
        best = r["mib_s"].get<double>() * (1 << 20);
      }
    if (best > 0) lab.emplace_back(b["backend"].get<std::string>(), best);
  }
  for (double d : cfg.dirty_mb_s) {
    double payload = d * 1e6 * epoch_s;
    double pages = std::ceil(payload / kPage);
    double bytes = pages * kPage + pages * 8 + cfg.devstate_bytes;  // pages + index + devstate
    json row{{"dirty_mb_s", d}, {"epoch_ms", cfg.epoch_ms}, {"pages", pages}, {"checkpoint_bytes", bytes}};
    for (double gbit : {25.0, 100.0}) {
      double t_ms = bytes * 8 / (gbit * 1e9) * 1e3 + cfg.fixed_us / 1e3;
      json l{{"transfer_ms", t_ms},
             {"keeps_up", t_ms < cfg.epoch_ms},
             {"link_utilization", bytes * 8 / (gbit * 1e9) / epoch_s},
             {"output_latency_ms", cfg.epoch_ms + t_ms}};
      row[fmt::format("link_{}g", int(gbit))] = l;
    }
    for (auto& [name, bps] : lab) {
      double t_ms = bytes / bps * 1e3;
      row["this_run_" + name] = json{{"transfer_ms", t_ms}, {"keeps_up", t_ms < cfg.epoch_ms}};
    }
    rows.push_back(std::move(row));
  }
  json out;
  out["epoch_ms"] = cfg.epoch_ms;
  out["fixed_cost_us"] = cfg.fixed_us;
  out["devstate_bytes"] = cfg.devstate_bytes;
  out["model"] =
      "checkpoint = ceil(dirty*epoch/4096) pages * (4096 + 8 index bytes) + devstate; transfer = bytes*8/link + "
      "fixed_cost; keeps up when transfer < epoch; output latency = epoch + transfer (the fixed cost includes the "
      "commit/ack round trip)";
  for (double gbit : {25.0, 100.0})
    out[fmt::format("max_dirty_mb_s_{}g", int(gbit))] =
        (gbit * 1e9 / 8) * (epoch_s - cfg.fixed_us / 1e6) / epoch_s / 1e6 * (4096.0 / 4104.0);
  out["rows"] = std::move(rows);
  return out;
}

void print_design(const json& d) {
  fmt::print("\nWhat the design needs on real links ({} ms epochs, fixed cost {} us per epoch, devstate {} B):\n",
             d["epoch_ms"].get<double>(), d["fixed_cost_us"].get<double>(), d["devstate_bytes"].get<double>());
  fmt::print("  {:>10} {:>12} {:>22} {:>22}\n", "dirty MB/s", "ckpt MB", "25 Gb/s xfer (latency)",
             "100 Gb/s xfer (latency)");
  for (auto& r : d["rows"]) {
    auto cell = [&](const char* k) {
      auto& l = r[k];
      return fmt::format("{:.2f} ms ({:.1f}){}", l["transfer_ms"].get<double>(), l["output_latency_ms"].get<double>(),
                         l["keeps_up"].get<bool>() ? "" : " !");
    };
    fmt::print("  {:>10.0f} {:>12.3f} {:>22} {:>22}", r["dirty_mb_s"].get<double>(),
               r["checkpoint_bytes"].get<double>() / 1e6, cell("link_25g"), cell("link_100g"));
    for (auto& [k, v] : r.items())
      if (k.rfind("this_run_", 0) == 0)
        fmt::print("   {} {:.1f} ms{}", k, v["transfer_ms"].get<double>(), v["keeps_up"].get<bool>() ? "" : " (falls behind)");
    fmt::print("\n");
  }
  fmt::print("  max sustainable dirty rate: {:.0f} MB/s at 25 Gb/s, {:.0f} MB/s at 100 Gb/s\n",
             d["max_dirty_mb_s_25g"].get<double>(), d["max_dirty_mb_s_100g"].get<double>());
  fmt::print("  (output latency = epoch + transfer incl. the commit/ack round trip; this_run_* columns use this run's\n"
             "   measured rate, which under software RoCE/TCG is functional only)\n");
}

// ---- command line ----------------------------------------------------------------------------

template <typename T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> v;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t c = s.find(',', pos);
    std::string item = s.substr(pos, c == std::string::npos ? std::string::npos : c - pos);
    if (!item.empty()) {
      if constexpr (std::is_same_v<T, std::string>)
        v.push_back(item);
      else
        v.push_back(T(std::stod(item)));
    }
    if (c == std::string::npos) break;
    pos = c + 1;
  }
  return v;
}

[[noreturn]] void usage(int rc) {
  std::fputs(
      "usage: ftvm_transport_bench [options]\n"
      "  --backend LIST     rdma,tcp,tcp+auth,tcp+encrypt (default: all that this build has)\n"
      "  --addr IP          address to listen/connect on (default $FTVM_BENCH_ADDR, $LAB_IP, 127.0.0.1)\n"
      "  --batches LIST     pages per epoch (default 64,512,4096)\n"
      "  --layouts LIST     scattered,staged (default both)\n"
      "  --seconds S        measured time per configuration (default 2)\n"
      "  --min-epochs N --max-epochs N --warmup N   (defaults 10, 20000, 3)\n"
      "  --region-mib N     receiver region and source buffer size, power of two (default 64)\n"
      "  --no-zero-copy     RDMA: do not register_source() the source buffer (copies through the ring)\n"
      "  --dirty LIST       dirty rates in MB/s for the design table (default 10,100,1000)\n"
      "  --epoch-ms MS      epoch length for the design table (default 25)\n"
      "  --fixed-us US      fixed per-epoch cost for the design table (default 50)\n"
      "  --json FILE        also write the JSON result to FILE\n",
      rc ? stderr : stdout);
  std::exit(rc);
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
#ifdef FTVM_HAVE_RDMA
  cfg.backends = {"rdma", "tcp", "tcp+auth", "tcp+encrypt"};
#else
  cfg.backends = {"tcp", "tcp+auth", "tcp+encrypt"};
#endif
  for (const char* var : {"FTVM_BENCH_ADDR", "LAB_IP"})
    if (const char* v = std::getenv(var); v && *v && cfg.addr.empty()) cfg.addr = v;
  if (cfg.addr.empty()) cfg.addr = "127.0.0.1";
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto val = [&]() -> std::string {
        if (i + 1 >= argc) usage(2);
        return argv[++i];
      };
      if (a == "--backend") cfg.backends = parse_list<std::string>(val());
      else if (a == "--addr") cfg.addr = val();
      else if (a == "--batches") cfg.batches = parse_list<uint32_t>(val());
      else if (a == "--layouts") cfg.layouts = parse_list<std::string>(val());
      else if (a == "--seconds") cfg.seconds = std::stod(val());
      else if (a == "--min-epochs") cfg.min_epochs = std::stoul(val());
      else if (a == "--max-epochs") cfg.max_epochs = std::stoul(val());
      else if (a == "--warmup") cfg.warmup = std::stoul(val());
      else if (a == "--region-mib") cfg.region_mib = std::stoul(val());
      else if (a == "--no-zero-copy") cfg.zero_copy = false;
      else if (a == "--dirty") cfg.dirty_mb_s = parse_list<double>(val());
      else if (a == "--epoch-ms") cfg.epoch_ms = std::stod(val());
      else if (a == "--fixed-us") cfg.fixed_us = std::stod(val());
      else if (a == "--json") cfg.json_path = val();
      else if (a == "-h" || a == "--help") usage(0);
      else usage(2);
    }
    for (auto& l : cfg.layouts)
      if (l != "scattered" && l != "staged") usage(2);
  } catch (const std::exception&) {
    usage(2);
  }

  json all;
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  utsname u{};
  uname(&u);
  std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  all["date"] = date;
  all["host"] = host;
  all["kernel"] = u.release;
  all["cpus"] = std::thread::hardware_concurrency();
  all["addr"] = cfg.addr;
  all["page_bytes"] = kPage;
  all["seconds_per_config"] = cfg.seconds;
  all["region_mib"] = cfg.region_mib;
  fmt::print("ftvm transport microbenchmark: {} on {} (kernel {}, {} cpus), addr {}\n", date, host, u.release,
             std::thread::hardware_concurrency(), cfg.addr);
  int rc = 0;
  json backends = json::array();
  json errors = json::array();
  for (auto& b : cfg.backends) {
    try {
      fmt::print("{}:\n", b);
      std::fflush(stdout);
      backends.push_back(run_backend(b, cfg));
      if (backends.back()["verify_errors"].get<uint64_t>() != 0) {
        fmt::print("  {}: {} sampled pages did not hold their epoch's data\n", b,
                   backends.back()["verify_errors"].get<uint64_t>());
        rc = 1;
      }
    } catch (const std::exception& e) {
      fmt::print("  {}: FAILED: {}\n", b, e.what());
      errors.push_back(json{{"backend", b}, {"error", e.what()}});
      rc = 1;
    }
  }
  all["backends"] = backends;
  all["auth_primitives"] = primitive_costs();
  all["errors"] = errors;
  all["design"] = design_table(cfg, backends);
  print_design(all["design"]);
  std::string text = all.dump(1);
  fmt::print("@@TRANSPORT_BENCH_JSON_BEGIN@@\n{}\n@@TRANSPORT_BENCH_JSON_END@@\n", text);
  std::fflush(stdout);
  if (!cfg.json_path.empty()) {
    std::ofstream f(cfg.json_path);
    f << text << "\n";
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", cfg.json_path.c_str());
      rc = 1;
    }
  }
  return rc;
}
