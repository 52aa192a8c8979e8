// OutputBuffer: output commit for one protected VM. Every frame the guest transmits is held
// here, tagged with the epoch in which the guest produced it, and goes out to the real network
// only once the standby has acknowledged that epoch's checkpoint. Frames toward the guest are
// never touched.
//
// Interception (QEMU 7.2, per guest netdev X; the loop COLO's primary uses with colo-compare):
//   chardev  ftvm-out-X  socket client -> RUN/<vm>.X.out.sock (ftd listens): QEMU writes here
//   chardev  ftvm-in-X   socket client -> RUN/<vm>.X.in.sock  (ftd listens): QEMU reads here
//   filter-redirector ftvm-return-X  netdev=X queue=rx indev=ftvm-in-X   (added first)
//   filter-redirector ftvm-divert-X  netdev=X queue=rx outdev=ftvm-out-X (added second)
// queue=rx is the netdev's receive queue: frames the NIC (the guest) sends *to* the backend
// (tap). The divert filter consumes them and writes them to ftvm-out-X. Frames ftd writes to
// ftvm-in-X are injected by the return filter as if sent by the NIC and continue to the filters
// *before* it in the rx traversal order (QEMU walks rx filters tail -> head), i.e. straight to
// the backend: the return filter must be added before the divert filter or released frames
// would be diverted again. Frames from the backend to the guest (the tx queue) pass no filter.
//
// Chardev framing (both directions, filter-redirector with vnet_hdr_support=on):
//   u32 big-endian frame length L | u32 big-endian vnet header length V | L bytes
// where the L bytes begin with the V-byte virtio-net header when the netdev uses one (a tap
// with vnet_hdr). ftd sets vnet_hdr_support=on on both filters so the stream says where the
// Ethernet frame starts (logs, checks) and passes V back unchanged; the bytes are forwarded
// untouched. Limits: 1 <= L <= kMaxFrame + V, V <= kMaxVnetHdr. A violation is a protocol
// error on that netdev's stream: it is logged, the stream is closed (QEMU then drops the
// guest's output on that netdev: nothing leaves unreleased), the guest keeps running.
//
// Epochs: frames read while epoch N is open get tag N. seal(N) is called by the session thread
// while the guest is paused at epoch N's cut: it first drains every divert socket (QEMU wrote
// all frames of the stopped guest before `stop` returned), so every frame the guest produced
// before the cut is tagged <= N; later frames are tagged N+1. release(N) (on the standby's ack
// of N) writes all frames tagged <= N, in order, to the return socket and logs one line
//   "output: VM released epoch N: F frames, B bytes (released total T frames) wall_us W"
// before writing (W = CLOCK_REALTIME in µs: no frame of epoch N can reach the wire before W).
//
// Modes: pass-through (frames are forwarded as they come; at enable, while degraded, after
// disable) and holding. pass_through() releases everything held (the primary runs on as the
// only copy; the frames are its legitimate output) and forwards from then on; the next seal()
// switches back to holding (frames before that cut are covered by the checkpoint being cut).
//
// Memory: held bytes are capped softly at `cap_bytes`: reaching it sets cut_requested(), which
// the session polls to cut the epoch early (it still waits for the in-flight ack, so the held
// bytes may exceed the cap by what the guest sends in one ack round trip). Frames are never
// dropped for memory. Thread-safe: one I/O thread per VM reads the divert sockets and flushes
// released bytes; the session thread calls the methods.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

constexpr uint32_t kMaxFrame = 65536;   // largest frame (without the vnet header) accepted
constexpr uint32_t kMaxVnetHdr = 64;    // largest vnet header length accepted (QEMU uses 10..20)

struct RedirFrame {
  uint32_t vnet_hdr_len = 0;
  std::vector<std::byte> data;  // vnet header (vnet_hdr_len bytes) followed by the frame
};

// Incremental parser of filter-redirector's stream. feed() appends every complete frame to
// `out`; throws ProtocolError (naming `what`) on a length of 0, a length over kMaxFrame +
// vnet header, a vnet header length over kMaxVnetHdr or over the frame length. After a throw
// the parser is unusable (the stream has lost its framing).
class RedirParser {
 public:
  RedirParser(std::string what, bool vnet_hdr) : what_(std::move(what)), vnet_(vnet_hdr) {}
  void feed(std::span<const std::byte> in, std::vector<RedirFrame>& out);
  // Bytes of an incomplete frame buffered (non-zero at EOF = a truncated frame).
  size_t partial_bytes() const { return buf_.size(); }

 private:
  std::string what_;
  bool vnet_;
  bool broken_ = false;
  std::vector<std::byte> buf_;
};

// The stream form of a frame (what QEMU's indev filter expects).
std::vector<std::byte> encode_redir_frame(const RedirFrame& f, bool vnet_hdr);

struct OutputOptions {
  uint64_t cap_bytes = uint64_t{16} << 20;
  bool vnet_hdr = true;
};

class OutputBuffer {
 public:
  OutputBuffer(std::string vm, OutputOptions opts);
  ~OutputBuffer();  // stops the I/O thread and closes the sockets (QEMU is not touched)
  OutputBuffer(const OutputBuffer&) = delete;
  OutputBuffer& operator=(const OutputBuffer&) = delete;

  // Sets up interception of `netdev` over `qmp` (chardevs + filters above; sockets in
  // `sock_dir`). Leftovers with ftvm's ids from an earlier ftd are removed first. Throws
  // ftvm::Error naming the netdev and the failing step; what was added is removed again.
  void attach(vmm::Monitor& qmp, const std::string& netdev, const std::string& sock_dir);
  // For tests: a channel over already-connected sockets (divert: ftd reads; ret: ftd writes).
  void add_channel(const std::string& netdev, UniqueFd divert, UniqueFd ret);
  // Starts the I/O thread (after the attach() calls).
  void start();

  void seal(uint64_t epoch);
  void release(uint64_t epoch);
  void pass_through(const std::string& why);
  bool holding() const;
  bool cut_requested() const { return cut_requested_.load(); }
  // Whether frames wait in the open (not yet cut) epoch: the guest is waiting for a checkpoint
  // to let them out, and the session may cut early (issue 14: output at the speed of a
  // checkpoint, not of the epoch interval). Lock-free; set by the I/O thread, cleared by seal().
  bool output_waiting() const { return open_frames_.load(std::memory_order_relaxed) != 0; }
  // Counts a cut made because output was waiting (status: output_cuts).
  void note_output_cut() { output_cuts_.fetch_add(1, std::memory_order_relaxed); }
  // Waits until every released byte was written and read by QEMU (SIOCOUTQ = 0), at most
  // `timeout`; returns false (and logs) when that did not happen in time.
  bool flush(std::chrono::milliseconds timeout);
  // Ends interception: releases everything held, removes the divert filter (the guest's
  // frames go straight to the backend again), forwards what QEMU had already diverted, waits
  // for it to be consumed, removes the return filter and both chardevs. Errors are logged,
  // never thrown (the VM must end up on its plain path whatever happens).
  void detach(vmm::Monitor& qmp);
  nlohmann::json status() const;

 private:
  struct Held {
    uint64_t epoch;
    std::vector<std::byte> wire;  // encoded
    size_t payload;               // frame bytes (vnet header included)
  };
  struct Channel {
    std::string netdev;
    UniqueFd divert, ret, listen_out, listen_in;
    std::string out_path, in_path;
    RedirParser parser;
    std::deque<Held> held;
    std::vector<std::byte> out;  // released, not yet written
    size_t out_off = 0;
    bool divert_open = true, ret_open = true;
    bool attached = false;  // filters added over QMP
    std::string error;
    Channel(std::string n, bool vnet) : netdev(std::move(n)), parser("netdev " + netdev + " divert stream", vnet) {}
  };

  void run();
  void read_locked(Channel& c);              // reads until EAGAIN/EOF, files frames
  void file_frame_locked(Channel& c, RedirFrame&& f);
  void write_locked(Channel& c);             // non-blocking write of c.out
  void wake();

  std::string vm_;
  OutputOptions opts_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Channel>> chans_;
  bool holding_ = false;
  std::string mode_reason_ = "not protected yet";
  uint64_t open_epoch_ = 1;
  uint64_t held_bytes_ = 0, held_peak_ = 0, held_frames_ = 0;
  uint64_t frames_in_ = 0, frames_released_ = 0, bytes_released_ = 0, frames_passed_ = 0;
  uint64_t last_released_epoch_ = 0, early_cuts_ = 0;
  std::atomic<bool> cut_requested_{false};
  std::atomic<uint64_t> open_frames_{0};   // held frames of the open epoch
  std::atomic<uint64_t> output_cuts_{0};
  UniqueFd wake_fd_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  bool detached_ = false;  // detach() done (idempotent)
};

// Netdev ids of the guest's NICs from a QEMU argv: `-netdev TYPE,id=X` (keyval or JSON) and
// `-nic` (QEMU names those netdevs "__org.qemu.nicN", N counting -nic options from 0).
std::vector<std::string> guest_netdevs(const std::vector<std::string>& argv);

}  // namespace ftvm::ftd
