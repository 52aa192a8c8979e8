// SanlockArbiter: the old quorum disk, as a sanlock resource lease per protected VM on storage
// both hosts see (a shared LUN, an LV, a file on NFS). The side that runs the VM holds its
// lease; sanlock's paxos leases make that one side at most.
//
// Layout of the lease area (--sanlock-lease PATH, file or block device, 512-byte sectors):
//   offset 0            the lockspace (--sanlock-lockspace, default "ftvm"; 1 MiB, 2000 hosts)
//   offset (1+i) MiB    resource lease "ftvm-slot-<i>", i = 0 .. slots-1, slots = size/1MiB - 1
// A VM uses slot sanlock_slot(name, slots) (FNV-1a of its name): both hosts compute the same
// slot from the same area. Two VMs that hash to one slot cannot run on different hosts at once:
// the second one's protection is refused with a clear error (more slots: a bigger area). The
// area is initialised once, before any ftd uses it, by scripts/ftvm-sanlock-init (sanlock
// direct init of the lockspace and every slot); ftd never writes it (initialising a lease
// another host holds would destroy it).
//
// Each ftd joins the lockspace with its --sanlock-host-id (add_lockspace at start; a lockspace
// already joined, e.g. by the admin, is fine) through the local sanlock daemon
// ($SANLOCK_RUN_DIR, default /run/sanlock).
//
// The holder of a VM's lease: a keeper process (`ftd __sanlock-keeper`, exec'd by ftd, one per
// VM and guest) that registers with the sanlock daemon, acquires the slot and holds it. It
// holds a pidfd on the guest's QEMU (the primary guest, or the twin on the standby), and
//   * QEMU exits                -> it releases the lease and exits (the lease frees in ~0.1 s);
//   * ftd says release ('R')    -> it releases and exits (ftd replaced the guest);
//   * ftd dies (its socket EOF) -> it keeps holding while QEMU lives: a guest that runs on
//                                  (the guard disarmed) keeps its lease; one the guard kills
//                                  releases it through the QEMU exit above. A restarted ftd that
//                                  protects the same QEMU again SIGKILLs that orphan (no fence:
//                                  only SIGTERM fences) and acquires the lease with its own;
//   * SIGTERM (sanlock's kill action when this host's lockspace renewal failed: storage cut,
//     I/O errors, at 8*io_timeout after the last good renewal) -> it SIGKILLs QEMU through
//     the pidfd first, then exits: the lease (now unrenewable) frees with it. Armed from the
//     first acquire call on, so a SIGTERM racing with a successful acquire fences too;
//   * its sanlock daemon connection hangs up (the daemon died) -> the same: QEMU SIGKILLed.
//
// Fencing contract (why the guest copy on a host that lost the lease is dead before the other
// host can acquire): sanlock lets another host acquire a lease of a host whose lockspace
// renewal failed only at 8*io_timeout + 60 s after that host's last good renewal (the 60 s is
// the watchdog fire timeout, compiled into sanlock 3.8). The local daemon sends SIGTERM to the
// keeper at 8*io_timeout (then SIGKILL if it is still there); the keeper's SIGTERM handler's
// first action is pidfd_send_signal(QEMU, SIGKILL) (async-signal-safe, no PID reuse race). So
// QEMU dies ~60 s before the other host may acquire. A dead daemon is seen at once (socket
// hangup) and also kills QEMU. Not covered without a watchdog device: a daemon that hangs
// (SIGSTOP, D-state) neither renews nor sends SIGTERM, and nothing kills QEMU until it resumes;
// in production run sanlock with wdmd and a hardware or softdog watchdog (the host resets then).
// The keeper is tiny and sleeps in poll(); a keeper killed with SIGKILL by someone else frees
// the lease while QEMU runs on: the primary's next may_run_alone answers Fence and ftd kills it.
//
// Answers (sanlock_answer(), pure):
//   may_activate (standby): starts a keeper for the twin that retries the acquire every
//     `retry` (the other host's live lease answers SANLK_ACQUIRE_IDLIVE); Yes once it holds the
//     lease, otherwise Wait (a live primary holds it; a dead host's lease frees only after
//     8*io_timeout + 60 s). Never Fence: a standby that lost waits for the partition to heal.
//   may_run_alone (primary): Yes while its keeper holds the lease; Fence when the keeper lost it
//     (fenced, exited, daemon gone); Wait while a keeper is still acquiring.
//   runs_here (primary, protection starting; or the standby's twin activated without asking:
//     planned failover, primary lost): with a budget, one acquire attempt now and an Error
//     saying why when it fails (protection is refused); with a zero budget, a keeper that
//     retries until the old side's QEMU is gone (the new primary then holds the lease).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/arbiter.h"
#include "common/fd.h"

namespace ftvm::ftd {

// What ftd knows about one VM's keeper.
enum class KeeperState {
  Invalid = 0,
  None = 1,       // no keeper for this VM
  Acquiring = 2,  // registered, acquire attempts failing (last_rc) or in progress
  Held = 3,       // the lease is held
  Lost = 4,       // the keeper fenced the guest (lease lost) or died while holding
  Released = 5,   // the keeper released the lease and exited (guest gone, or told to)
};
const char* to_string(KeeperState s);

enum class SanlockQuestion { Activate, RunAlone };

// The decision, pure (unit-tested): see the header comment.
checkpoint::ArbiterAnswer sanlock_answer(SanlockQuestion q, KeeperState s);

// The slot of `vm` in an area of `slots` slots (FNV-1a 32 of the name, modulo slots). slots > 0.
uint32_t sanlock_slot(const std::string& vm, uint32_t slots);
// "LOCKSPACE:ftvm-slot-<slot>:PATH:OFFSET" (sanlock's resource string; ':' in PATH escaped).
std::string sanlock_resource_string(const std::string& lockspace, const std::string& path, uint32_t slot);
// Slots in an area of `bytes` bytes (0 when too small for the lockspace and one slot).
uint32_t sanlock_slots(uint64_t bytes);
// A readable meaning of a sanlock return code (-243 -> "held by another live host", ...).
std::string sanlock_rc_text(int rc);

struct SanlockOptions {
  std::string lease_path;          // the lease area
  std::string lockspace = "ftvm";  // its lockspace name
  uint32_t host_id = 0;            // 1..2000, different on each host
  uint32_t io_timeout_s = 10;      // written into this host's delta lease at add_lockspace
  std::chrono::milliseconds retry{500};  // between acquire attempts of a waiting keeper
  std::string keeper_exe = "/proc/self/exe";  // ftd itself (argv[1] "__sanlock-keeper")
};

class SanlockArbiter final : public checkpoint::Arbiter {
 public:
  // Sizes the area, joins the lockspace (blocks ~2*io_timeout+1 s unless already joined), starts
  // the watcher thread (all signals blocked in it). Throws Error saying what failed (daemon not
  // running, area not initialised, ...).
  explicit SanlockArbiter(SanlockOptions o);
  // Keepers are left running: each holds its guest's lease for as long as that guest runs.
  ~SanlockArbiter() override;
  SanlockArbiter(const SanlockArbiter&) = delete;
  SanlockArbiter& operator=(const SanlockArbiter&) = delete;

  std::string kind() const override { return "sanlock"; }
  checkpoint::ArbiterAnswer may_activate(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterAnswer may_run_alone(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  void runs_here(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterStatus status() const override;

  KeeperState state_of(const std::string& vm) const;

 private:
  struct Keeper {
    pid_t pid = -1;
    pid_t guest_pid = -1;
    UniqueFd ctl;    // socketpair end: keeper reports lines "H", "W <rc>", "F <why>"
    UniqueFd pidfd;  // on the keeper, for reaping
    std::string buf;
    KeeperState state = KeeperState::Acquiring;
    int last_rc = 0;
    std::string why;  // why lost
    double held_since_wall_ms = 0;
    bool exited = false;
  };
  void spawn(const std::string& vm, pid_t guest_pid, bool once);
  // Ends keepers of (vm, guest_pid) that an earlier ftd left running (ftd restarted while the
  // guest ran on), so that this ftd's keeper can take the lease.
  void adopt_orphans(const std::string& vm, pid_t guest_pid);
  void refresh(const std::string& vm, Keeper& k) const;  // reads reports, reaps
  void release(Keeper& k) const;
  std::string describe(const std::string& vm, const Keeper& k) const;

  const SanlockOptions o_;
  uint32_t slots_ = 0;
  mutable std::mutex mu_;
  mutable std::map<std::string, Keeper> keepers_;
  mutable double confirmed_wall_ms_ = 0;
  mutable std::chrono::steady_clock::time_point ls_checked_{};
  mutable std::string ls_state_;
  mutable bool ls_joined_ = false;
  // Reads the keepers' reports every 200 ms (logs a held or lost lease when it happens, reaps
  // exited keepers), also when no session asks.
  bool stop_ = false;
  std::condition_variable cv_;
  std::thread watcher_;
};

// PIDs of keeper processes (any parent) holding or acquiring `resource` for `guest_pid`.
std::vector<pid_t> sanlock_find_keepers(const std::string& resource, pid_t guest_pid);

// `ftd __sanlock-keeper RESOURCE once|retry RETRY_MS GUEST_PID` with fd 3 = the control socket, fd 4 =
// a pidfd on the guest's QEMU. Returns the exit status.
int sanlock_keeper_main(int argc, char** argv);

}  // namespace ftvm::ftd
