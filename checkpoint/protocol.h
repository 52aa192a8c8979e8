// The replication session protocol between a primary ftd and a standby ftd, one session per
// protected VM. Messages travel as transport control messages (transport/transport.h); bulk
// data (RAM pages, staged epochs) travels as one-sided writes into two regions the standby
// registers. This file is the whole protocol: the sequence, the receiver's state machine, the
// versioning rule and the encoding of every message.
//
// Sequence (one session):
//
//   primary ftd                                              standby ftd
//   -----------                                              -----------
//   OpenSession{version, session_id, vm name, RAM size,
//               QEMU argv, disks} ------------------------>  create one raw image per disk,
//                                                            start paused twin QEMU on them
//                                                            (-S -incoming defer; its own binary,
//                                                            argv/XML checked against its policy,
//                                                            else Error), map its RAM,
//                                                            register region 1 = twin RAM (until
//                                                            the first Commit), region 2 = staging
//   <------------------------------- SessionReady{staging capacity, twin pid} | Error{text}
//   [sync: pre-copy passes while the guest runs]
//   write(region 1, page * 4096, page) ... (RAM straight into the twin; no epoch yet)
//   DiskWrite{epoch 1, disk, op, offset, length, data} ... (the mirror job's full copy and the
//            guest's writes; straight into the twin's images while no epoch is committed)
//   [steady state, epoch N = 1, 2, ...]
//   DiskWrite{N, ...} ... (every guest disk write of epoch N, in the order QEMU issued it;
//                          may start before Commit(N-1) is acked; buffered until Commit(N))
//   (guest paused: stop, collect dirty pages, copy to staging, save device state, cont)
//   StagingGrow{bytes} ------------------------------------>  (only when an epoch exceeds
//   <--------------------------------------- StagingGranted{capacity}        the capacity)
//   EpochBegin{N, bytes} ----------------------------------->  (logged; torn-epoch diagnosis)
//   write(region 2, 0, [indices | pages | device state])
//   Commit{N, pages, devstate bytes, staged digest,
//          RAM digest, flags, disk ops, disk digest,
//          staged tag} ------------------------------------>  verify digest (keyed tag on an
//                                                             authenticated connection) +
//                                                             indices and the
//                                                             epoch's disk ops; apply pages to
//                                                             twin RAM and disk ops to the
//                                                             images; keep devstate N
//   <----------------------------------------------- Ack{N, Applied | Rejected, reason}
//   ... at most one epoch between Commit and Ack ...
//   Activate{} (planned failover, after a Commit with kFinal) -> load devstate N, cont
//   <---------------------------------------------------------- ActivateDone{ok, text}
//   PrimaryLost{reason} (the primary QEMU died) ------------->  activate at once
//   <------------------------------------------ Suspect{silent ms} (primary silent for half the
//   (the primary pauses its guest and sends Resolve)           heartbeat timeout: one-way cut?)
//   <------------------------------------------------- Takeover{reason} (sent, best effort,
//   (a primary that receives it was only stalled, not dead:   before the standby activates
//    it kills its own QEMU at once: no two running copies)    on silence)
//   Disable{} ---------------------------------------------->  destroy twin, end session
//   [a second path: a TCP connection to the standby's second address (OpenSession's
//    second_path_host is where it comes from) or, without one, to the same host:port]
//   HeartbeatLink{session_id} ------------------------------->  attached to the session; its
//   heartbeats count as life; Disable/PrimaryLost/Takeover      silence = silence on BOTH paths
//   may travel on it when the data path is broken
//   Goodbye (transport-level) / link loss ------------------->  see state machine
//   [after the session broke, on a fresh connection]
//   Resolve{session_id, vm name} ---------------------------->  settle the session's fate
//   <------------------------------- Resolution{Dropped | Active | Unknown, text}
//   (Dropped/Unknown: the primary is the only copy and runs on; Active: it kills its QEMU)
//
// Standby state machine (per session):
//   Opening  --OpenSession ok-->  Syncing  --Commit(1) applied-->  Protected
//   Protected --Commit(N) applied--> Protected        (a rejected Commit changes nothing:
//                                                      the replica stays at N-1, Ack says why)
//   Syncing|Protected --Disable--> Closed (twin destroyed)
//   Protected --PrimaryLost | Activate | silence > heartbeat timeout | link down--> Active
//     (failover=manual: PrimaryLost or silence --> Lost instead: the twin stays paused;
//      Lost --`ftctl failover --force` on the standby host--> Active; Lost --Resolve--> Closed)
//   Syncing --PrimaryLost | silence | link down--> Closed (no committed checkpoint: the twin
//                                                   is destroyed; nothing can be resumed)
//   Active: the twin runs the guest; the session ends; the VM now lives on this host.
// Invariant: twin RAM changes only (a) during Syncing, by region-1 writes, and (b) when a
// Commit whose staged bytes and indices verify is applied in full. A partial epoch (no
// Commit, or a Commit that does not verify) is never applied. The same holds for the twin's
// disk images: DiskWrites go straight in only while Syncing; afterwards they are buffered
// per epoch (checkpoint/disk_journal.h) and written when their epoch's Commit verifies (RAM
// and disk both, or neither); on activation the buffered, uncommitted ones are dropped.
// A DiskWrite whose count or digest does not match its Commit is a protocol error (the
// session ends and the primary resynchronizes): unlike RAM it cannot be retransmitted.
//
// Versioning: kProtocolVersion is sent in OpenSession. The standby accepts exactly its own
// version and otherwise answers Error{"protocol version X not supported (this ftd speaks Y)"}
// and closes. Any change to a message layout bumps the version; message types are never
// reused. Type 0 is Invalid in every enum here. All integers are little-endian.
//
// Encoding: one source per message. Every message below is a plain aggregate that lists its
// wire fields once, in wire order, in a static member
//
//   static void fields(auto& m, auto&& f) { f("session_id", m.session_id); f("reason", m.reason); }
//
// (`m` is the message, const while encoding; `f` a visitor called as f(name, member) or
// f(name, member, option)). The ONE generic encoder and the ONE generic decoder in protocol.cc
// walk that list; nothing else spells a message's layout. The wire form of a field follows
// from its C++ type:
//   uint32_t                  4 bytes
//   uint64_t, int64_t         8 bytes (int64_t as its two's complement)
//   enum class (FailoverPolicy, AckStatus, Verdict, DiskOp)
//                             4 bytes, whatever the enum's own width; decoding accepts only
//                             1..last (wire_enum() below), never 0 = Invalid
//   std::string               u32 length, then the bytes; at most kMaxString bytes, or
//                             wire::Max{n}
//   std::vector<E>            u32 count (at most wire::Max{n}, which is required), then each E
//   a struct with fields()    its fields, inline (DiskInfo)
//   std::array<std::byte, N>  N raw bytes
//   bytes with wire::Rest     the rest of the body, no length (the last field only)
// Field options: wire::Max{n} (the length or count limit), wire::Rest{}, wire::Version{} (a
// u32 that must equal kProtocolVersion; checked as soon as it is read, so an older peer's
// differently laid-out message reads as a version mismatch, not as a malformed field).
// Limits hold both ways: encode() refuses a message over a limit (ftvm::Error, naming the
// message and field) so that nothing this side sends is refused by the peer for its size.
// decode<T>() rejects a short, long or malformed body whole with ftvm::ProtocolError naming
// the message and the field (e.g. "OpenSession: field 'disks[1].source': message truncated
// ..."); after the layout it runs the message's semantic checks (ranges, relations between
// fields: see protocol.cc, check()). A new field is one line in fields() and a version bump;
// the unit tests (tests/unit/test_protocol.cc) check that every member is listed and that the
// bytes of every message equal the checked-in vectors.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace ftvm::checkpoint {

// 2: disks (OpenSession.disks, DiskWrite, Commit.disk_*); 3: SessionReady.heartbeat_timeout_ms,
// Resolve/Resolution (split-brain arbitration after a lost link); 4: OpenSession.second_path_host,
// OpenSession.ram_used; 5: OpenSession.failover, OpenSession.origin, OpenSession.history (issue 11),
// Commit.staged_tag (keyed epoch digest on authenticated connections)
inline constexpr uint32_t kProtocolVersion = 5;
inline constexpr uint32_t kRegionRam = 1;      // the twin's RAM (writable only while Syncing)
inline constexpr uint32_t kRegionStaging = 2;  // one epoch: [u64 index * n][pages][devstate]

enum class MsgType : uint16_t {
  Invalid = 0,
  OpenSession = 1,
  SessionReady = 2,
  StagingGrow = 3,
  StagingGranted = 4,
  EpochBegin = 5,
  Commit = 6,
  Ack = 7,
  Activate = 8,
  ActivateDone = 9,
  PrimaryLost = 10,
  Disable = 11,
  Error = 12,
  Takeover = 13,
  HeartbeatLink = 14,
  DiskWrite = 15,
  Resolve = 16,
  Resolution = 17,
  Suspect = 18,
};
const char* to_string(MsgType t);

// Options a message's fields() may pass with a field (see "Encoding" above).
namespace wire {
struct Max {  // length limit of a string, count limit of a vector
  size_t n;
};
struct Rest {};     // bytes filling the rest of the body, without a length
struct Version {};  // u32 that must be kProtocolVersion
}  // namespace wire

inline constexpr size_t kMaxString = 64 * 1024;  // default limit of a string field
inline constexpr size_t kMaxArgs = 4096;
inline constexpr size_t kMaxDomainXml = 1 << 20;
inline constexpr size_t kMaxHistory = 64 << 10;
inline constexpr size_t kMaxDisks = 64;
inline constexpr uint64_t kMaxDiskWriteData = 512 * 1024;

// An enum's wire range: values 1..last are valid; `noun` names it in errors.
struct WireEnum {
  const char* noun;
  uint32_t last;
};

// One replicated disk of the VM. The standby creates a raw image of `size` bytes for it and
// gives the twin that image wherever the primary's command line names `source`.
struct DiskInfo {
  std::string id;      // the primary's name for it (QEMU device/node), for logs and status
  std::string source;  // the file the primary's QEMU opened (as QEMU reports it)
  uint64_t size = 0;   // guest-visible size in bytes (a multiple of 512)
  static void fields(auto& m, auto&& f) {
    f("id", m.id);
    f("source", m.source);
    f("size", m.size);
  }
  friend bool operator==(const DiskInfo&, const DiskInfo&) = default;
};

enum class FailoverPolicy : uint32_t { Invalid = 0, Auto = 1, Manual = 2 };
const char* to_string(FailoverPolicy p);
constexpr WireEnum wire_enum(FailoverPolicy) { return {"failover policy", 2}; }

// Primary -> standby, the first message on a fresh data connection: protect this VM. The
// standby checks version, policy (argv/XML, arbiter kind, memory) and either creates the disk
// images, starts the paused twin, registers regions 1 and 2 and answers SessionReady, or
// answers Error and closes.
struct OpenSession {
  static constexpr MsgType kType = MsgType::OpenSession;
  uint32_t version = kProtocolVersion;
  uint64_t session_id = 0;
  uint64_t ram_size = 0;
  uint32_t page_size = 4096;
  std::string vm_name;
  std::vector<std::string> qemu_argv;  // at most kMaxArgs
  std::vector<DiskInfo> disks;         // at most kMaxDisks
  // A libvirt domain's XML (migratable form; at most kMaxDomainXml bytes): the standby makes
  // the twin a libvirt domain from it instead of running qemu_argv itself. "" = plain QEMU.
  std::string libvirt_xml;
  // The arbiter kind both sides must use for this VM (checkpoint/arbiter.h: "none",
  // "fence-command", "corosync", ...; at most 64 bytes). The standby refuses a session whose
  // kind it does not have configured: a VM arbitrated on one side only is not arbitrated.
  std::string arbiter = "none";
  // reprotect=auto: the port this primary's ftd listens on for replication. When the twin takes
  // over, the standby protects it again towards <this primary's address>:port (0 = manual).
  uint32_t reprotect_port = 0;
  // The primary's own address on the network of the second path (a second NIC; at most 64
  // bytes), when the second path goes to another address of the standby ("" = from the data
  // connection's host). The standby accepts HeartbeatLink and Resolve for this session only
  // from the data connection's host or from this one; it arrives on the authenticated data
  // connection.
  std::string second_path_host;
  // Bytes of guest RAM that hold data now (the rest are holes the sync leaves out): what the
  // twin needs at once. The standby refuses a session it has not that much memory for.
  uint64_t ram_used = 0;
  // What the standby does when the primary is lost (PrimaryLost, or silence with the arbiter's
  // Yes): Auto resumes the twin at once; Manual keeps it paused until `ftctl failover --force`
  // on the standby host. A planned Activate resumes it under either policy.
  FailoverPolicy failover = FailoverPolicy::Auto;
  // The primary ftd's name for history records ("hostname@listen-address"), at most 256 bytes.
  std::string origin;
  // The VM's event history so far (JSON array text, tools/ftd/history.h; at most kMaxHistory
  // bytes): the standby continues it when its twin takes over, so the history follows the VM.
  std::string history;

  static void fields(auto& m, auto&& f) {
    f("version", m.version, wire::Version{});
    f("session_id", m.session_id);
    f("ram_size", m.ram_size);
    f("page_size", m.page_size);
    f("vm_name", m.vm_name);
    f("qemu_argv", m.qemu_argv, wire::Max{kMaxArgs});
    f("disks", m.disks, wire::Max{kMaxDisks});
    f("libvirt_xml", m.libvirt_xml, wire::Max{kMaxDomainXml});
    f("arbiter", m.arbiter, wire::Max{64});
    f("reprotect_port", m.reprotect_port);
    f("second_path_host", m.second_path_host, wire::Max{64});
    f("ram_used", m.ram_used);
    f("failover", m.failover);
    f("origin", m.origin, wire::Max{256});
    f("history", m.history, wire::Max{kMaxHistory});
  }
  friend bool operator==(const OpenSession&, const OpenSession&) = default;
};

// Standby -> primary, the answer to an OpenSession it accepted: the twin is up (paused) and
// both regions are registered. The primary starts the sync (region-1 writes).
struct SessionReady {
  static constexpr MsgType kType = MsgType::SessionReady;
  uint64_t session_id = 0;
  uint64_t staging_capacity = 0;
  int64_t twin_pid = 0;
  // The standby activates the twin after this much silence from the primary. The primary
  // pauses its guest (and its guard fences QEMU if ftd itself stalls) well before that, so
  // the two copies never run at the same time (docs/ARCHITECTURE.md, "Split brain"). Never 0.
  uint32_t heartbeat_timeout_ms = 0;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("staging_capacity", m.staging_capacity);
    f("twin_pid", m.twin_pid);
    f("heartbeat_timeout_ms", m.heartbeat_timeout_ms);
  }
  friend bool operator==(const SessionReady&, const SessionReady&) = default;
};

// Primary -> standby, before staging an epoch larger than the granted capacity: grow region 2
// to `bytes`. The standby re-registers a larger staging area (bounded by the guest's size,
// else Error) and answers StagingGranted.
struct StagingGrow {
  static constexpr MsgType kType = MsgType::StagingGrow;
  uint64_t session_id = 0;
  uint64_t bytes = 0;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("bytes", m.bytes);
  }
  friend bool operator==(const StagingGrow&, const StagingGrow&) = default;
};

// Standby -> primary, the answer to StagingGrow: region 2 now holds `capacity` bytes.
struct StagingGranted {
  static constexpr MsgType kType = MsgType::StagingGranted;
  uint64_t session_id = 0;
  uint64_t capacity = 0;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("capacity", m.capacity);
  }
  friend bool operator==(const StagingGranted&, const StagingGranted&) = default;
};

// Primary -> standby, before the staging writes of epoch `epoch` (`bytes` of them). The standby
// only logs it (a torn epoch, written but never committed, is then diagnosable).
struct EpochBegin {
  static constexpr MsgType kType = MsgType::EpochBegin;
  uint64_t session_id = 0;
  uint64_t epoch = 0;
  uint64_t bytes = 0;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("epoch", m.epoch);
    f("bytes", m.bytes);
  }
  friend bool operator==(const EpochBegin&, const EpochBegin&) = default;
};

// Primary -> standby, after epoch `epoch`'s staging writes and DiskWrites: "epoch N is staged".
// The standby verifies the staged bytes (digest or keyed tag), the indices and the epoch's disk
// ops; applies all of it to the twin (RAM and disks, or neither) and answers Ack{Applied}, or
// changes nothing and answers Ack{Rejected, reason}.
struct Commit {
  static constexpr MsgType kType = MsgType::Commit;
  static constexpr uint32_t kFinal = 1;  // last epoch before a planned failover; guest stays paused
  uint64_t session_id = 0;
  uint64_t epoch = 0;  // never 0
  uint64_t page_count = 0;
  uint64_t devstate_bytes = 0;
  // Integrity of the staged bytes [0, staged_size()), which arrive by one-sided writes:
  //  * unauthenticated connection (--insecure): staged_digest = digest_bytes() (XXH3-64, against
  //    accidents), staged_tag all zero;
  //  * authenticated connection (Connection::epoch_key() != nullptr): staged_tag =
  //    staged_tag(epoch_key, epoch, staged bytes) (checkpoint/digest.h: Poly1305 under a
  //    per-epoch key derived from the session's handshake; against an attacker who can write
  //    into the staging region), staged_digest 0 and ignored.
  // The standby checks the one its connection calls for; the other proves nothing.
  uint64_t staged_digest = 0;
  uint64_t ram_digest = 0;     // primary's full-RAM digest at this checkpoint
  uint32_t flags = 0;          // kFinal or 0
  uint64_t disk_ops = 0;     // DiskWrites tagged with this epoch
  uint64_t disk_digest = 0;  // DiskOpDigest (checkpoint/disk_journal.h) over them, in wire order
  std::array<std::byte, 16> staged_tag{};  // see staged_digest; 16 raw bytes on the wire, last
  uint64_t staged_size() const { return page_count * (8 + 4096) + devstate_bytes; }

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("epoch", m.epoch);
    f("page_count", m.page_count);
    f("devstate_bytes", m.devstate_bytes);
    f("staged_digest", m.staged_digest);
    f("ram_digest", m.ram_digest);
    f("flags", m.flags);
    f("disk_ops", m.disk_ops);
    f("disk_digest", m.disk_digest);
    f("staged_tag", m.staged_tag);
  }
  friend bool operator==(const Commit&, const Commit&) = default;
};

enum class AckStatus : uint32_t { Invalid = 0, Applied = 1, Rejected = 2 };
constexpr WireEnum wire_enum(AckStatus) { return {"status", 2}; }

// Standby -> primary, the answer to Commit `epoch`: Applied (the replica is at `epoch`; the
// primary releases the epoch's buffered output) or Rejected (the replica stays at the previous
// epoch; `reason` says why; the primary retransmits or resynchronizes).
struct Ack {
  static constexpr MsgType kType = MsgType::Ack;
  uint64_t session_id = 0;
  uint64_t epoch = 0;
  AckStatus status = AckStatus::Invalid;
  std::string reason;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("epoch", m.epoch);
    f("status", m.status);
    f("reason", m.reason);
  }
  friend bool operator==(const Ack&, const Ack&) = default;
};

// Primary -> standby, planned failover, after a Commit with kFinal was acked: load the last
// committed device state and resume the twin. The standby answers ActivateDone.
struct Activate {
  static constexpr MsgType kType = MsgType::Activate;
  uint64_t session_id = 0;

  static void fields(auto& m, auto&& f) { f("session_id", m.session_id); }
  friend bool operator==(const Activate&, const Activate&) = default;
};

// Standby -> primary, the answer to Activate: ok = 1 (the twin runs; the primary's guest must
// stay stopped) or 0 with `text` saying what failed.
struct ActivateDone {
  static constexpr MsgType kType = MsgType::ActivateDone;
  uint64_t session_id = 0;
  uint32_t ok = 0;
  std::string text;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("ok", m.ok);
    f("text", m.text);
  }
  friend bool operator==(const ActivateDone&, const ActivateDone&) = default;
};

// Primary -> standby (data path or second path), when the primary's QEMU died: the standby
// activates the twin at once (failover=manual: it goes to Lost and waits for the operator).
struct PrimaryLost {
  static constexpr MsgType kType = MsgType::PrimaryLost;
  uint64_t session_id = 0;
  std::string reason;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("reason", m.reason);
  }
  friend bool operator==(const PrimaryLost&, const PrimaryLost&) = default;
};

// Primary -> standby (data path or second path), `ftctl unprotect`: the standby destroys the
// twin and ends the session.
struct Disable {
  static constexpr MsgType kType = MsgType::Disable;
  uint64_t session_id = 0;

  static void fields(auto& m, auto&& f) { f("session_id", m.session_id); }
  friend bool operator==(const Disable&, const Disable&) = default;
};

// Either direction (MsgType::Error): the sender refuses or gives up; `text` says what failed
// and what to do. The receiver logs it and ends the session (the standby destroys the twin).
struct ErrorMsg {
  static constexpr MsgType kType = MsgType::Error;
  std::string text;

  static void fields(auto& m, auto&& f) { f("text", m.text); }
  friend bool operator==(const ErrorMsg&, const ErrorMsg&) = default;
};

// Primary -> standby, the first and only request on the second path (a TCP connection beside
// the data connection): it attaches the connection to the session, whose heartbeats then count
// as life; Disable/PrimaryLost/Takeover may follow on it when the data path is broken.
struct HeartbeatLink {
  static constexpr MsgType kType = MsgType::HeartbeatLink;
  uint64_t session_id = 0;

  static void fields(auto& m, auto&& f) { f("session_id", m.session_id); }
  friend bool operator==(const HeartbeatLink&, const HeartbeatLink&) = default;
};

// Standby -> primary, best effort, just before the standby activates the twin on silence: a
// primary that receives it was only stalled, not dead, and kills its own QEMU at once (no two
// running copies).
struct Takeover {
  static constexpr MsgType kType = MsgType::Takeover;
  uint64_t session_id = 0;
  std::string reason;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("reason", m.reason);
  }
  friend bool operator==(const Takeover&, const Takeover&) = default;
};

// Standby -> primary, when the primary has been silent for half the heartbeat timeout while the
// standby's own frames may still get through (a one-way partition): the primary pauses its
// guest and settles the session with Resolve, before the standby could resume the twin.
struct Suspect {
  static constexpr MsgType kType = MsgType::Suspect;
  uint64_t session_id = 0;
  uint32_t silent_ms = 0;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("silent_ms", m.silent_ms);
  }
  friend bool operator==(const Suspect&, const Suspect&) = default;
};

// Primary -> standby, the first and only request on a fresh connection from a primary whose
// session broke (link reset, silence, ack timeout, a planned failover that lost its answer):
// "what became of session `session_id` (never 0) of VM `vm_name`?". The standby settles the
// session's fate at once and for good, in one step with its own activation decision (whichever
// comes first wins): a twin not yet resumed is dropped and will never run; a twin that runs (or
// is being resumed) stays. It answers Resolution; the primary runs on, or fences its QEMU, by
// the answer.
struct Resolve {
  static constexpr MsgType kType = MsgType::Resolve;
  uint64_t session_id = 0;
  std::string vm_name;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("vm_name", m.vm_name);
  }
  friend bool operator==(const Resolve&, const Resolve&) = default;
};

enum class Verdict : uint32_t {
  Invalid = 0,
  Dropped = 1,  // the twin of that session will never run (dropped now or earlier)
  Active = 2,   // the twin runs (or is being resumed): the primary must fence its QEMU
  Unknown = 3,  // no session of that id and no running twin of that VM here
};
const char* to_string(Verdict v);
constexpr WireEnum wire_enum(Verdict) { return {"verdict", 3}; }

// Standby -> primary, the answer to Resolve. Dropped/Unknown: the primary is the only copy and
// runs on; Active: it kills its QEMU.
struct Resolution {
  static constexpr MsgType kType = MsgType::Resolution;
  uint64_t session_id = 0;
  Verdict verdict = Verdict::Invalid;
  std::string text;

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("verdict", m.verdict);
    f("text", m.text);
  }
  friend bool operator==(const Resolution&, const Resolution&) = default;
};

enum class DiskOp : uint8_t { Invalid = 0, Write = 1, Zero = 2, Trim = 3 };  // u32 on the wire
constexpr WireEnum wire_enum(DiskOp) { return {"operation", 3}; }

// Primary -> standby: one guest disk operation of epoch `epoch` (the epoch whose checkpoint will
// contain it). Write carries `length` bytes of data; Zero and Trim none (Trim reads back as
// zeros on the standby). Large writes are split by the sender into several DiskWrites of at
// most kMaxDiskWriteData bytes; each counts as one op. While Syncing the standby writes it
// straight into the twin's image; afterwards it buffers it until its epoch's Commit verifies.
struct DiskWrite {
  static constexpr MsgType kType = MsgType::DiskWrite;
  uint64_t session_id = 0;
  uint64_t epoch = 0;  // never 0
  uint32_t disk = 0;   // index into OpenSession::disks
  DiskOp op = DiskOp::Invalid;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<std::byte> data;  // the rest of the body: `length` bytes for Write, none else

  static void fields(auto& m, auto&& f) {
    f("session_id", m.session_id);
    f("epoch", m.epoch);
    f("disk", m.disk);
    f("op", m.op);
    f("offset", m.offset);
    f("length", m.length);
    f("data", m.data, wire::Rest{});
  }
  friend bool operator==(const DiskWrite&, const DiskWrite&) = default;
};

// Every message, in MsgType order: the registry decode_any() and dispatch() use.
using AnyMessage = std::variant<OpenSession, SessionReady, StagingGrow, StagingGranted, EpochBegin, Commit, Ack,
                                Activate, ActivateDone, PrimaryLost, Disable, ErrorMsg, Takeover, HeartbeatLink,
                                DiskWrite, Resolve, Resolution, Suspect>;

template <typename T>
concept Message = requires(T& m) {
  { T::kType } -> std::convertible_to<MsgType>;
  T::fields(m, [](const char*, auto&, auto&&...) {});
};

// The MsgType a message travels as.
template <Message T> constexpr MsgType type_of() { return T::kType; }

// The body of a control message of type T::kType. Throws ftvm::Error when a field exceeds its
// limit (see "Encoding"), or for a DiskWrite whose data does not match its op and length.
template <Message T> std::vector<std::byte> encode(const T& m);
// Encodes a DiskWrite without copying `data` into a DiskWrite first (same bytes, same checks).
std::vector<std::byte> encode_disk_write(uint64_t session_id, uint64_t epoch, uint32_t disk, DiskOp op,
                                         uint64_t offset, uint64_t length, std::span<const std::byte> data);

// Decodes the body of a control message of type T::kType. Throws ftvm::ProtocolError on a
// short, long or otherwise malformed body, naming the message and the field (the message is
// rejected whole; nothing is partially decoded into the caller's state).
template <Message T> T decode(std::span<const std::byte> body);

// Decodes a control message of any type into the matching alternative. Throws ProtocolError
// as decode<T>() does, and for type 0 or a type no message has.
AnyMessage decode_any(uint16_t type, std::span<const std::byte> body);

// Typed dispatch: decodes `m` (anything with `uint16_t type` and a byte-container `body`, e.g.
// transport::ControlMessage) and calls the overload of `handler` for its message type. The
// handler must accept every message (std::visit): list the ones you expect and end with
// `[](const auto&) {...}` for the rest, e.g.
//   cp::dispatch(*m, cp::overloaded{
//       [&](const cp::Ack& a) { on_ack(a); },
//       [&](const cp::Suspect& s) { on_suspect(s); },
//       [&](const auto& other) { throw ProtocolError(...); }});
// Returns what the handler returns. Throws as decode_any().
template <class... F>
struct overloaded : F... {
  using F::operator()...;
};
template <class... F>
overloaded(F...) -> overloaded<F...>;

template <class Control, class Handler>
decltype(auto) dispatch(const Control& m, Handler&& handler) {
  return std::visit(std::forward<Handler>(handler), decode_any(m.type, std::span<const std::byte>(m.body)));
}

// Typed send: encodes `m` and sends it as control message T::kType on `conn` (a
// transport::Connection or anything with its send_control()). Throws what encode() and
// send_control() throw.
template <class Conn, Message T>
void send(Conn& conn, const T& m) {
  const auto body = encode(m);
  conn.send_control(static_cast<uint16_t>(T::kType), body);
}

}  // namespace ftvm::checkpoint
