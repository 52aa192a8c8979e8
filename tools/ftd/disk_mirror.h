// DiskMirror: disk replication for one protected VM on the primary (issue 5; Remus's disk
// buffer, with QEMU's own mirror job as the write interceptor).
//
// Per writable disk D of the VM (found with query-block):
//   ftd serves an NBD export (vmm-glue/nbd_server.h) on RUN/nbd/<vm>.<i>.sock, owned by QEMU's
//   uid and accepting only QEMU's pid;
//   blockdev-add   {driver: nbd, node-name: ftvm-nbd-<i>, server: unix RUN/nbd/<vm>.<i>.sock}
//   blockdev-mirror {job-id: ftvm-mirror-<i>, device: D's node, target: ftvm-nbd-<i>,
//                    sync: full, copy-mode: write-blocking}
// The job first copies the whole disk (the initial full copy), then, being in write-blocking
// mode, completes every guest write only after the NBD write to ftd completed. ftd acks NBD
// writes as soon as they are queued here and forwards them, in arrival order, to the standby
// as DiskWrite messages tagged with their epoch. The job is never pivoted; stop() cancels it.
//
// Epoch invariant: QEMU's `stop` drains all block I/O, including the mirror's NBD writes, so
// when `stop` returns every write the guest issued before the cut is in the queue. The session
// calls cut(N) while the guest is stopped: writes queued so far carry epoch <= N, later ones
// N+1. After BLOCK_JOB_READY the job's dirty bitmap stays clean (write-blocking mode copies
// every guest write synchronously), so the target holds every write that completed on the
// source: the first checkpoint must wait for ready() (initial copy done).
//
// Memory: queued bytes are capped (Options::queue_cap). A write arriving over the cap blocks
// its NBD server thread (and so the guest's write: back-pressure) until the session forwards
// the queue, except while the guest is stopped for a checkpoint (allow_overflow(true)): the
// drain inside `stop` must never wait for the session thread, which is waiting for `stop`.
//
// Thread-safety: NBD server threads enqueue; every other method is for the session thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/disk_journal.h"
#include "checkpoint/protocol.h"
#include "transport/transport.h"
#include "vmm-glue/nbd_server.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

struct DiskSpec {
  std::string id;      // QEMU's device name (or qdev id / node name when it has none)
  std::string node;    // the block node the mirror reads (query-block inserted.node-name)
  std::string source;  // the image file (inserted.file)
  std::string format;  // inserted.drv
  uint64_t size = 0;   // guest-visible bytes
};

// The writable disks of the VM behind `qmp` (read-only ones and empty drives are skipped: the
// twin opens them as they are). Problems that make a disk unreplicable are appended to
// `problems` (one sentence each, naming the disk and what to change). A VMM without a block
// layer (no query-block) has no disks.
std::vector<DiskSpec> find_disks(vmm::Monitor& qmp, std::vector<std::string>& problems);

class DiskMirror {
 public:
  struct Options {
    uint64_t queue_cap = uint64_t{64} << 20;
  };
  // `run_dir`: where the NBD sockets go (RUN/nbd/). qemu_pid/qemu_uid: the only peer allowed to
  // connect, and the owner of the sockets.
  DiskMirror(std::string vm, std::string run_dir, std::vector<DiskSpec> disks, pid_t qemu_pid, uid_t qemu_uid,
             Options opts);
  ~DiskMirror();
  DiskMirror(const DiskMirror&) = delete;
  DiskMirror& operator=(const DiskMirror&) = delete;

  bool empty() const { return disks_.empty(); }
  // What the standby needs to create the twin's images.
  std::vector<checkpoint::DiskInfo> infos() const;

  // Starts the NBD exports and the mirror jobs (a full copy); writes from now on carry
  // `epoch` until the next cut(). Throws ftvm::Error (with what QEMU said) when a job cannot
  // be started; whatever was set up is torn down again then.
  void start(vmm::Monitor& qmp, uint64_t epoch);
  // Cancels the jobs, removes the NBD nodes and closes the exports. Queued writes are
  // dropped; writes arriving meanwhile are acked and dropped. Never throws (logs).
  void stop(vmm::Monitor& qmp) noexcept;
  bool running() const { return running_; }

  // Feeds QMP events (BLOCK_JOB_READY / _ERROR / _COMPLETED / _CANCELLED of our jobs).
  void on_events(const std::deque<nlohmann::json>& events);
  // Polls query-block-jobs (progress and readiness). QEMU's events that arrive meanwhile stay
  // queued in the Monitor for the session, which feeds them to on_events().
  void poll_jobs(vmm::Monitor& qmp);
  // Every job reached ready (the initial copy is complete).
  bool ready() const;
  // Non-empty when replication of some disk failed (job error, NBD connection lost): says
  // which disk and why. The session goes degraded on it and re-protects with a new full copy.
  std::string failure() const;

  // The guest is stopped at the cut of `epoch`: later writes belong to epoch + 1.
  void cut(uint64_t epoch);
  // While true, writes never block on the queue cap (the guest is stopped for a checkpoint).
  void allow_overflow(bool on);
  // Sends queued writes tagged <= up_to to the standby (one DiskWrite per op, large writes
  // split), in arrival order. Returns the number of ops sent.
  size_t forward(transport::Connection& conn, uint64_t session_id, uint64_t up_to);
  // Count and digest of the ops of `epoch` sent so far (all of them once forward(up_to >=
  // epoch) returned), for its Commit. Forgets epochs below `epoch`.
  std::pair<uint64_t, uint64_t> epoch_summary(uint64_t epoch);

  // Fault injection (tests): closes every NBD connection as if the socket broke.
  void drop_connections();
  nlohmann::json status() const;

 private:
  struct Op {
    uint64_t epoch;
    uint32_t disk;
    checkpoint::DiskOp kind;
    uint64_t offset, length;
    std::vector<std::byte> data;
  };
  class Backend;
  int enqueue(uint32_t disk, checkpoint::DiskOp kind, uint64_t offset, uint64_t length,
              std::span<const std::byte> data);
  void set_failure(const std::string& why);
  void mark_ready(uint32_t disk);  // initial copy of `disk` complete (BLOCK_JOB_READY or query)

  std::string vm_, run_dir_;
  std::vector<DiskSpec> disks_;
  pid_t qemu_pid_;
  uid_t qemu_uid_;
  Options opts_;
  std::atomic<bool> running_{false};
  std::vector<std::unique_ptr<Backend>> backends_;  // outlive servers_ (declared first)
  std::vector<std::unique_ptr<vmm::nbd::Server>> servers_;  // replaced under mu_ (status() reads it)

  mutable std::mutex mu_;
  std::condition_variable space_;
  std::deque<Op> queue_;
  uint64_t queued_bytes_ = 0, peak_queued_bytes_ = 0;
  uint64_t tag_ = 1;
  bool overflow_ok_ = false, discarding_ = true;
  std::string failure_;
  std::vector<bool> ready_;
  std::vector<std::pair<uint64_t, uint64_t>> progress_;  // query-block-jobs offset/len per disk
  uint64_t forwarded_ops_ = 0, forwarded_bytes_ = 0, sync_bytes_ = 0;
  double start_wall_ms_ = 0, ready_after_ms_ = 0;

  // Session thread only.
  std::map<uint64_t, checkpoint::DiskOpDigest> sent_;  // per epoch, ops forwarded
};

}  // namespace ftvm::ftd
