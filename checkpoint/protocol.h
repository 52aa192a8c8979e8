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
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
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

// One replicated disk of the VM. The standby creates a raw image of `size` bytes for it and
// gives the twin that image wherever the primary's command line names `source`.
struct DiskInfo {
  std::string id;      // the primary's name for it (QEMU device/node), for logs and status
  std::string source;  // the file the primary's QEMU opened (as QEMU reports it)
  uint64_t size = 0;   // guest-visible size in bytes (a multiple of 512)
};

enum class FailoverPolicy : uint32_t { Invalid = 0, Auto = 1, Manual = 2 };
const char* to_string(FailoverPolicy p);

struct OpenSession {
  uint32_t version = kProtocolVersion;
  uint64_t session_id = 0;
  uint64_t ram_size = 0;
  uint32_t page_size = 4096;
  std::string vm_name;
  std::vector<std::string> qemu_argv;
  std::vector<DiskInfo> disks;  // at most kMaxDisks
  // A libvirt domain's XML (migratable form; at most kMaxDomainXml bytes): the standby makes
  // the twin a libvirt domain from it instead of running qemu_argv itself. "" = plain QEMU.
  std::string libvirt_xml;
  // The arbiter kind both sides must use for this VM (checkpoint/arbiter.h: "none",
  // "fence-command", "corosync", ...). The standby refuses a session whose kind it does not
  // have configured: a VM arbitrated on one side only is not arbitrated.
  std::string arbiter = "none";
  // reprotect=auto: the port this primary's ftd listens on for replication. When the twin takes
  // over, the standby protects it again towards <this primary's address>:port (0 = manual).
  uint32_t reprotect_port = 0;
  // The primary's own address on the network of the second path (a second NIC), when the
  // second path goes to another address of the standby ("" = from the data connection's host).
  // The standby accepts HeartbeatLink and Resolve for this session only from the data
  // connection's host or from this one; it arrives on the authenticated data connection.
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
};
inline constexpr size_t kMaxDomainXml = 1 << 20;
inline constexpr size_t kMaxHistory = 64 << 10;
inline constexpr size_t kMaxDisks = 64;

struct SessionReady {
  uint64_t session_id = 0;
  uint64_t staging_capacity = 0;
  int64_t twin_pid = 0;
  // The standby activates the twin after this much silence from the primary. The primary
  // pauses its guest (and its guard fences QEMU if ftd itself stalls) well before that, so
  // the two copies never run at the same time (docs/ARCHITECTURE.md, "Split brain").
  uint32_t heartbeat_timeout_ms = 0;
};

struct StagingGrow {
  uint64_t session_id = 0;
  uint64_t bytes = 0;
};

struct StagingGranted {
  uint64_t session_id = 0;
  uint64_t capacity = 0;
};

struct EpochBegin {
  uint64_t session_id = 0;
  uint64_t epoch = 0;
  uint64_t bytes = 0;
};

struct Commit {
  static constexpr uint32_t kFinal = 1;  // last epoch before a planned failover; guest stays paused
  uint64_t session_id = 0;
  uint64_t epoch = 0;
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
  uint32_t flags = 0;
  uint64_t disk_ops = 0;     // DiskWrites tagged with this epoch
  uint64_t disk_digest = 0;  // DiskOpDigest (checkpoint/disk_journal.h) over them, in wire order
  std::array<std::byte, 16> staged_tag{};  // see staged_digest; 16 raw bytes on the wire, last
  uint64_t staged_size() const { return page_count * (8 + 4096) + devstate_bytes; }
};

enum class AckStatus : uint32_t { Invalid = 0, Applied = 1, Rejected = 2 };

struct Ack {
  uint64_t session_id = 0;
  uint64_t epoch = 0;
  AckStatus status = AckStatus::Invalid;
  std::string reason;
};

struct Activate {
  uint64_t session_id = 0;
};

struct ActivateDone {
  uint64_t session_id = 0;
  uint32_t ok = 0;
  std::string text;
};

struct PrimaryLost {
  uint64_t session_id = 0;
  std::string reason;
};

struct Disable {
  uint64_t session_id = 0;
};

struct ErrorMsg {
  std::string text;
};

// First and only request on the second path (a TCP connection beside an RDMA session): it
// carries heartbeats, and Disable/PrimaryLost/Takeover when the data path is broken.
struct HeartbeatLink {
  uint64_t session_id = 0;
};

struct Takeover {
  uint64_t session_id = 0;
  std::string reason;
};

// Standby -> primary, when the primary has been silent for half the heartbeat timeout while the
// standby's own frames may still get through (a one-way partition): the primary pauses its
// guest and settles the session with Resolve, before the standby could resume the twin.
struct Suspect {
  uint64_t session_id = 0;
  uint32_t silent_ms = 0;
};

// First and only request on a fresh connection from a primary whose session broke (link
// reset, silence, ack timeout, a planned failover that lost its answer): "what became of
// session `session_id` of VM `vm_name`?". The standby settles the session's fate at once and
// for good, in one step with its own activation decision (whichever comes first wins):
// a twin not yet resumed is dropped and will never run; a twin that runs (or is being
// resumed) stays. The primary runs on, or fences its QEMU, by the answer.
struct Resolve {
  uint64_t session_id = 0;
  std::string vm_name;
};

enum class Verdict : uint32_t {
  Invalid = 0,
  Dropped = 1,  // the twin of that session will never run (dropped now or earlier)
  Active = 2,   // the twin runs (or is being resumed): the primary must fence its QEMU
  Unknown = 3,  // no session of that id and no running twin of that VM here
};
const char* to_string(Verdict v);

struct Resolution {
  uint64_t session_id = 0;
  Verdict verdict = Verdict::Invalid;
  std::string text;
};

enum class DiskOp : uint8_t { Invalid = 0, Write = 1, Zero = 2, Trim = 3 };  // u32 on the wire

// One guest disk operation of epoch `epoch` (the epoch whose checkpoint will contain it).
// Write carries `length` bytes of data; Zero and Trim none (Trim reads back as zeros on the
// standby). Large writes are split by the sender into several DiskWrites of at most
// kMaxDiskWriteData bytes; each counts as one op.
struct DiskWrite {
  uint64_t session_id = 0;
  uint64_t epoch = 0;
  uint32_t disk = 0;  // index into OpenSession::disks
  DiskOp op = DiskOp::Invalid;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<std::byte> data;
};
inline constexpr uint64_t kMaxDiskWriteData = 512 * 1024;

// Encoders produce the body of a control message of the matching MsgType.
std::vector<std::byte> encode(const OpenSession&);
std::vector<std::byte> encode(const SessionReady&);
std::vector<std::byte> encode(const StagingGrow&);
std::vector<std::byte> encode(const StagingGranted&);
std::vector<std::byte> encode(const EpochBegin&);
std::vector<std::byte> encode(const Commit&);
std::vector<std::byte> encode(const Ack&);
std::vector<std::byte> encode(const Activate&);
std::vector<std::byte> encode(const ActivateDone&);
std::vector<std::byte> encode(const PrimaryLost&);
std::vector<std::byte> encode(const Disable&);
std::vector<std::byte> encode(const ErrorMsg&);
std::vector<std::byte> encode(const Takeover&);
std::vector<std::byte> encode(const HeartbeatLink&);
std::vector<std::byte> encode(const DiskWrite&);
std::vector<std::byte> encode(const Resolve&);
std::vector<std::byte> encode(const Resolution&);
std::vector<std::byte> encode(const Suspect&);
// Encodes a DiskWrite without copying `data` into a DiskWrite first.
std::vector<std::byte> encode_disk_write(uint64_t session_id, uint64_t epoch, uint32_t disk, DiskOp op,
                                         uint64_t offset, uint64_t length, std::span<const std::byte> data);
template <typename T> constexpr MsgType type_of();

// Decoders throw ftvm::ProtocolError on a short, long or otherwise malformed body (the
// message is rejected whole; nothing is partially decoded into the caller's state).
template <typename T> T decode(std::span<const std::byte> body);

template <> constexpr MsgType type_of<OpenSession>() { return MsgType::OpenSession; }
template <> constexpr MsgType type_of<SessionReady>() { return MsgType::SessionReady; }
template <> constexpr MsgType type_of<StagingGrow>() { return MsgType::StagingGrow; }
template <> constexpr MsgType type_of<StagingGranted>() { return MsgType::StagingGranted; }
template <> constexpr MsgType type_of<EpochBegin>() { return MsgType::EpochBegin; }
template <> constexpr MsgType type_of<Commit>() { return MsgType::Commit; }
template <> constexpr MsgType type_of<Ack>() { return MsgType::Ack; }
template <> constexpr MsgType type_of<Activate>() { return MsgType::Activate; }
template <> constexpr MsgType type_of<ActivateDone>() { return MsgType::ActivateDone; }
template <> constexpr MsgType type_of<PrimaryLost>() { return MsgType::PrimaryLost; }
template <> constexpr MsgType type_of<Disable>() { return MsgType::Disable; }
template <> constexpr MsgType type_of<ErrorMsg>() { return MsgType::Error; }
template <> constexpr MsgType type_of<Takeover>() { return MsgType::Takeover; }
template <> constexpr MsgType type_of<HeartbeatLink>() { return MsgType::HeartbeatLink; }
template <> constexpr MsgType type_of<DiskWrite>() { return MsgType::DiskWrite; }
template <> constexpr MsgType type_of<Resolve>() { return MsgType::Resolve; }
template <> constexpr MsgType type_of<Resolution>() { return MsgType::Resolution; }
template <> constexpr MsgType type_of<Suspect>() { return MsgType::Suspect; }

}  // namespace ftvm::checkpoint
