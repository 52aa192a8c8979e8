// Authentication of replication connections: the pre-shared key, the handshake's proofs and
// session keys, and the per-frame tags. Every primitive is libsodium's; this file only composes
// them (see docs/ARCHITECTURE.md "Security" for the threat model).
//
// Key: 32 random bytes in a file per host pair (`ftd --generate-key FILE` writes one with
// randombytes_buf), mode 0600 or stricter, owned by root or the user running ftd. Both ftd of a
// pair load the same file (--key-file). The key never leaves the host; the Hello carries only
// its 8-byte key id (a keyed BLAKE2b of nothing, useless for recovering the key) so that a
// mismatch is reported as "different key files" rather than as an attack.
//
// Handshake (TCP: transport/tcp/tcp_transport.cc drives it; RDMA: the same scheme, see below):
//   initiator (primary)  --Hello{version, caps|Auth, max_write, nonce_i, key_id}-->  responder
//   initiator            <--Hello{version, caps|Auth, max_write, nonce_r, key_id}--  responder
//   transcript T = initiator's Hello frame bytes || responder's Hello frame bytes (header+body)
//   master  = BLAKE2b-256(key = PSK, "ftvm-session-v2" || T)                      (generichash)
//   k_proof_i, k_proof_r, k_frame_i2r, k_frame_r2i, k_epoch = crypto_kdf_derive_from_key(master,
//                                                                      1..5, "ftvmsess")
//   initiator --Auth{HMAC-SHA512-256(k_proof_i, T)}-->  responder   (crypto_auth)
//   initiator <--Auth{HMAC-SHA512-256(k_proof_r, T)}--  responder
// Each side checks the other's proof with crypto_auth_verify. The nonces (32 random bytes
// each) make every transcript, hence every master and every proof, fresh: a recorded
// handshake replayed to a standby fails because the standby's nonce differs. Distinct proof
// keys per role stop a proof from being reflected back. The transcript covers both Hellos
// (versions, capabilities including encryption, write limits), so nothing in them can be
// changed by a man in the middle without failing the proofs.
//
// Frames after the handshake: each direction has its own frame key and a sequence number that
// starts at 0 and increases by one per frame (never sent: both sides count). A frame's tag is
//   Poly1305(otk, header(32 bytes) || payload as sent),  otk = ChaCha20(k_frame, nonce = seq)
// first 32 bytes (crypto_stream_chacha20_ietf + crypto_onetimeauth), 16 bytes after the
// payload. A replayed, dropped, reordered, truncated or altered frame fails its tag. With
// encryption the payload is ChaCha20(k_frame, nonce = seq, block counter from 1) of the
// plaintext (crypto_stream_chacha20_ietf_xor_ic) and the tag covers the ciphertext
// (encrypt-then-MAC, the ChaCha20-Poly1305 construction); headers stay readable (authenticated,
// not encrypted).
//
// RDMA (transport/rdma/rdma_transport.cc): the CM private data is too small for the nonces (56
// bytes on connect), so the same handshake is spread over the CM exchange and the first SENDs:
//   initiator --CM connect private data: RdmaHello{version, caps|Auth, depth, size, key_id}-->
//   initiator <--CM accept private data: RdmaHello{... responder's key_id}--  (a responder whose
//              key id differs, or that has no key, rejects with its RdmaHello as reject data:
//              both sides report the key id mismatch as TCP does)
//   both, once ESTABLISHED: SEND AuthNonce{nonce}, then (after the peer's) SEND AuthProof{proof}
//   transcript T = "ftvm-rdma" || initiator's RdmaHello || responder's RdmaHello ||
//                  initiator's nonce || responder's nonce
// and derive()/prove()/verify() as above. Nothing but AuthNonce/AuthProof is accepted before the
// peer's proof verified; accept()/connect_rdma() return only after both proofs verified. Every
// later SEND (control fragments, heartbeats, region advertisements, Goodbye) carries a tag as a
// TCP frame does: Poly1305 over its 32-byte header || payload under the direction's sequence
// number, 16 bytes after the payload. RDMA payloads are never encrypted (--encrypt keeps a
// connection on TCP): one-sided WRITEs land in the peer's memory without the peer's CPU, so
// the transport cannot tag or decrypt them. They are authenticated end to end instead by the
// keyed epoch digest below.
//
// Keyed epoch digest (checkpoint/digest.h staged_tag(), Commit.staged_tag): on an authenticated
// connection the Commit of epoch N carries
//   Poly1305(otk_N, staged bytes),  otk_N = ChaCha20(k_epoch, nonce = N) first 32 bytes
// (the Direction construction with the epoch number as the sequence number), and the standby
// applies the epoch only if its staging area tags the same: a one-sided write (or anything
// else) that altered the staged bytes makes the Commit fail (Ack Rejected; nothing committed
// changes). k_epoch is per connection, so a tag from another connection or session never
// verifies. One-time-key rule: the primary tags exactly one content per epoch number per
// connection (a rejected epoch is retransmitted with the same bytes, hence the same tag; epoch
// numbers only grow), so no Poly1305 key ever authenticates two different messages.
// Why Poly1305 and not keyed BLAKE2b (crypto_generichash with a key, a PRF with no one-time
// rule): measured with bench/transport_bench.cc in one run (docs/BENCHMARKS.md "Keyed epoch
// digest"), Poly1305 runs 3-4.7x faster per MB than keyed BLAKE2b on the 2-vCPU test VM
// (1.5-2.3 GB/s vs ~0.5 GB/s), and the tag is computed on the primary's and the standby's path
// once per epoch. Unauthenticated (--insecure) connections keep the unkeyed XXH3 digest
// (Commit.staged_digest), 4-5x faster still (7-10 GB/s).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace ftvm::transport::auth {

inline constexpr size_t kKeySize = 32;
inline constexpr size_t kNonceSize = 32;
inline constexpr size_t kKeyIdSize = 8;
inline constexpr size_t kProofSize = 32;  // crypto_auth_hmacsha512256_BYTES
inline constexpr size_t kTagSize = 16;    // crypto_onetimeauth_BYTES

// Initialises libsodium (idempotent, thread-safe). Throws ftvm::Error when it cannot.
void init();

// A loaded pre-shared key. Immutable; shared between connections.
struct Key {
  std::array<unsigned char, kKeySize> bytes{};
  std::array<unsigned char, kKeyIdSize> id{};  // key id announced in the Hello
  std::string path;                            // where it was loaded from (for messages)
  std::string id_hex() const;
  ~Key();
};

// Reads a key file: a regular file of exactly 32 bytes with no group or other permission
// bits (0600 or 0400), owned by root or by this process's user. Throws ftvm::Error naming the file, what is wrong with it and the fix
// (`chmod 600 FILE`, `ftd --generate-key FILE`).
std::shared_ptr<const Key> load_key(const std::string& path);

// Creates `path` (must not exist; mode 0600) holding 32 bytes from randombytes_buf, fsynced.
// Throws SysError/Error naming the file.
void generate_key(const std::string& path);

// Fresh random handshake nonce.
std::array<unsigned char, kNonceSize> random_nonce();

// Per-connection secrets derived from the key and the handshake transcript.
struct SessionKeys {
  std::array<unsigned char, 32> proof_initiator{}, proof_responder{};
  std::array<unsigned char, 32> frame_i2r{}, frame_r2i{};
  std::array<unsigned char, 32> epoch{};  // keyed epoch digest (checkpoint/digest.h staged_tag)
  ~SessionKeys();
};
SessionKeys derive(const Key& key, std::span<const std::byte> transcript);

// HMAC-SHA512-256 of the transcript under a proof key; and its constant-time check.
std::array<std::byte, kProofSize> prove(const std::array<unsigned char, 32>& proof_key,
                                        std::span<const std::byte> transcript);
bool verify(const std::array<unsigned char, 32>& proof_key, std::span<const std::byte> transcript,
            std::span<const std::byte> proof);

// One direction of a connection after the handshake: its frame key and the next sequence
// number. Not thread-safe (a connection is used by one thread at a time).
class Direction {
 public:
  Direction() = default;
  explicit Direction(const std::array<unsigned char, 32>& key, bool encrypt) : key_(key), encrypt_(encrypt), on_(true) {}
  ~Direction();
  Direction(const Direction&) = default;
  Direction& operator=(const Direction&) = default;
  bool on() const { return on_; }
  bool encrypt() const { return encrypt_; }
  uint64_t seq() const { return seq_; }

  // Starts the tag of the next frame (uses sequence number seq(), which then advances).
  void begin();
  // Feeds bytes of the frame (header, then payload as it is on the wire) to the tag.
  void update(const void* p, size_t n);
  // Ends the frame's tag.
  std::array<std::byte, kTagSize> finish();
  // Constant-time comparison of finish() with `tag`.
  bool finish_and_check(std::span<const std::byte, kTagSize> tag);
  // Encryption, for the frame begun last: dst = src XOR keystream(from block 1). dst may equal
  // src. Only with encrypt().
  void crypt(std::byte* dst, const std::byte* src, size_t n) const;

 private:
  std::array<unsigned char, 32> key_{};
  bool encrypt_ = false;
  bool on_ = false;
  uint64_t seq_ = 0;        // sequence number of the next begin()
  uint64_t cur_seq_ = 0;    // of the frame begun last
  alignas(16) unsigned char state_[256]{};  // crypto_onetimeauth_state (checked in auth.cc)
};

}  // namespace ftvm::transport::auth
