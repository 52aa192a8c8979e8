#include "transport/auth.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

#include <fmt/format.h>

#include "common/error.h"
#include "common/fd.h"

namespace ftvm::transport::auth {

static_assert(sizeof(crypto_onetimeauth_state) <= 256, "Direction::state_ too small for crypto_onetimeauth_state");
static_assert(alignof(crypto_onetimeauth_state) <= 16);
static_assert(crypto_auth_hmacsha512256_BYTES == kProofSize);
static_assert(crypto_auth_hmacsha512256_KEYBYTES == 32);
static_assert(crypto_onetimeauth_BYTES == kTagSize);
static_assert(crypto_kdf_KEYBYTES == 32);
static_assert(crypto_stream_chacha20_ietf_KEYBYTES == 32 && crypto_stream_chacha20_ietf_NONCEBYTES == 12);

namespace {
constexpr char kKdfContext[crypto_kdf_CONTEXTBYTES + 1] = "ftvmsess";
constexpr char kMasterLabel[] = "ftvm-session-v2";
constexpr char kKeyIdLabel[] = "ftvm-key-id-v2";

std::array<unsigned char, 12> seq_nonce(uint64_t seq) {
  std::array<unsigned char, 12> n{};
  for (int i = 0; i < 8; ++i) n[static_cast<size_t>(i)] = static_cast<unsigned char>(seq >> (8 * i));
  return n;
}

crypto_onetimeauth_state* st(unsigned char* p) { return reinterpret_cast<crypto_onetimeauth_state*>(p); }
}  // namespace

void init() {
  static std::once_flag once;
  static int rc = 0;
  std::call_once(once, [] { rc = sodium_init(); });
  if (rc < 0) throw Error("libsodium failed to initialise (sodium_init); replication authentication is unavailable");
}

std::string Key::id_hex() const {
  std::string s;
  for (auto b : id) s += fmt::format("{:02x}", b);
  return s;
}

Key::~Key() { sodium_memzero(bytes.data(), bytes.size()); }
SessionKeys::~SessionKeys() { sodium_memzero(this, sizeof *this); }
Direction::~Direction() { sodium_memzero(key_.data(), key_.size()); }

std::shared_ptr<const Key> load_key(const std::string& path) {
  init();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd)
    throw SysError(errno, "open key file " + path,
                   "create one with `ftd --generate-key " + path + "` and copy it to the peer host (mode 0600)");
  struct stat sb {};
  check_sys(::fstat(fd.get(), &sb), "fstat key file " + path);
  if (!S_ISREG(sb.st_mode)) throw Error(fmt::format("key file {} is not a regular file", path));
  if (sb.st_mode & (S_IRWXG | S_IRWXO))
    throw Error(fmt::format("key file {} has mode {:04o}: group or others may read it; run `chmod 600 {}` (and "
                            "consider the key exposed: generate a new one with `ftd --generate-key`)",
                            path, sb.st_mode & 07777, path));
  if (sb.st_uid != 0 && sb.st_uid != ::geteuid())
    throw Error(fmt::format("key file {} is owned by uid {}, neither root nor this process (uid {}): another user "
                            "could replace it; run `chown root {}`",
                            path, sb.st_uid, ::geteuid(), path));
  if (sb.st_size != static_cast<off_t>(kKeySize))
    throw Error(fmt::format("key file {} holds {} bytes, expected exactly {} (create one with `ftd --generate-key "
                            "FILE`)",
                            path, static_cast<long long>(sb.st_size), kKeySize));
  auto k = std::make_shared<Key>();
  size_t got = 0;
  while (got < kKeySize) {
    ssize_t n = ::read(fd.get(), k->bytes.data() + got, kKeySize - got);
    if (n < 0 && errno == EINTR) continue;
    check_sys(n, "read key file " + path);
    if (n == 0) throw Error(fmt::format("key file {} shrank while being read", path));
    got += static_cast<size_t>(n);
  }
  crypto_generichash(k->id.data(), k->id.size(), reinterpret_cast<const unsigned char*>(kKeyIdLabel),
                     sizeof kKeyIdLabel - 1, k->bytes.data(), k->bytes.size());
  k->path = path;
  return k;
}

void generate_key(const std::string& path) {
  init();
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd)
    throw SysError(errno, "create key file " + path,
                   errno == EEXIST ? "refusing to overwrite an existing key; remove it first if you mean to replace it"
                                   : "");
  std::array<unsigned char, kKeySize> k;
  randombytes_buf(k.data(), k.size());
  // The umask may have cleared bits but never adds any; make the mode exact anyway.
  check_sys(::fchmod(fd.get(), 0600), "chmod 600 key file " + path);
  size_t put = 0;
  while (put < k.size()) {
    ssize_t n = ::write(fd.get(), k.data() + put, k.size() - put);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      sodium_memzero(k.data(), k.size());
      ::unlink(path.c_str());
      throw SysError(e, "write key file " + path);
    }
    put += static_cast<size_t>(n);
  }
  sodium_memzero(k.data(), k.size());
  check_sys(::fsync(fd.get()), "fsync key file " + path);
}

std::array<unsigned char, kNonceSize> random_nonce() {
  init();
  std::array<unsigned char, kNonceSize> n;
  randombytes_buf(n.data(), n.size());
  return n;
}

SessionKeys derive(const Key& key, std::span<const std::byte> transcript) {
  unsigned char master[crypto_kdf_KEYBYTES];
  crypto_generichash_state h;
  crypto_generichash_init(&h, key.bytes.data(), key.bytes.size(), sizeof master);
  crypto_generichash_update(&h, reinterpret_cast<const unsigned char*>(kMasterLabel), sizeof kMasterLabel - 1);
  crypto_generichash_update(&h, reinterpret_cast<const unsigned char*>(transcript.data()), transcript.size());
  crypto_generichash_final(&h, master, sizeof master);
  SessionKeys s;
  crypto_kdf_derive_from_key(s.proof_initiator.data(), 32, 1, kKdfContext, master);
  crypto_kdf_derive_from_key(s.proof_responder.data(), 32, 2, kKdfContext, master);
  crypto_kdf_derive_from_key(s.frame_i2r.data(), 32, 3, kKdfContext, master);
  crypto_kdf_derive_from_key(s.frame_r2i.data(), 32, 4, kKdfContext, master);
  crypto_kdf_derive_from_key(s.epoch.data(), 32, 5, kKdfContext, master);
  sodium_memzero(master, sizeof master);
  sodium_memzero(&h, sizeof h);
  return s;
}

std::array<std::byte, kProofSize> prove(const std::array<unsigned char, 32>& proof_key,
                                        std::span<const std::byte> transcript) {
  std::array<std::byte, kProofSize> out;
  crypto_auth_hmacsha512256(reinterpret_cast<unsigned char*>(out.data()),
                            reinterpret_cast<const unsigned char*>(transcript.data()), transcript.size(),
                            proof_key.data());
  return out;
}

bool verify(const std::array<unsigned char, 32>& proof_key, std::span<const std::byte> transcript,
            std::span<const std::byte> proof) {
  if (proof.size() != kProofSize) return false;
  return crypto_auth_hmacsha512256_verify(reinterpret_cast<const unsigned char*>(proof.data()),
                                          reinterpret_cast<const unsigned char*>(transcript.data()),
                                          transcript.size(), proof_key.data()) == 0;
}

void Direction::begin() {
  cur_seq_ = seq_++;
  unsigned char otk[crypto_onetimeauth_KEYBYTES];
  auto n = seq_nonce(cur_seq_);
  crypto_stream_chacha20_ietf(otk, sizeof otk, n.data(), key_.data());
  crypto_onetimeauth_init(st(state_), otk);
  sodium_memzero(otk, sizeof otk);
}

void Direction::update(const void* p, size_t n) {
  if (n) crypto_onetimeauth_update(st(state_), static_cast<const unsigned char*>(p), n);
}

std::array<std::byte, kTagSize> Direction::finish() {
  std::array<std::byte, kTagSize> t;
  crypto_onetimeauth_final(st(state_), reinterpret_cast<unsigned char*>(t.data()));
  return t;
}

bool Direction::finish_and_check(std::span<const std::byte, kTagSize> tag) {
  auto t = finish();
  return crypto_verify_16(reinterpret_cast<const unsigned char*>(t.data()),
                          reinterpret_cast<const unsigned char*>(tag.data())) == 0;
}

void Direction::crypt(std::byte* dst, const std::byte* src, size_t n) const {
  if (n == 0) return;
  auto nonce = seq_nonce(cur_seq_);
  crypto_stream_chacha20_ietf_xor_ic(reinterpret_cast<unsigned char*>(dst), reinterpret_cast<const unsigned char*>(src),
                                     n, nonce.data(), 1, key_.data());
}

}  // namespace ftvm::transport::auth
