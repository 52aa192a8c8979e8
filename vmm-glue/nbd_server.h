// An NBD server: the subset of the protocol QEMU's NBD client (blockdev-add driver=nbd, used as
// the target of a blockdev-mirror) needs, served on a unix socket.
//
// Protocol subset (NetworkBlockDevice doc/proto.md):
//   * fixed newstyle handshake only (a client without NBD_FLAG_C_FIXED_NEWSTYLE is closed);
//     NBD_FLAG_NO_ZEROES is offered and honoured;
//   * options: NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME (old clients), NBD_OPT_LIST,
//     NBD_OPT_ABORT. Every other option (STRUCTURED_REPLY, LIST/SET_META_CONTEXT, STARTTLS,
//     EXTENDED_HEADERS, unknown numbers) is answered NBD_REP_ERR_UNSUP and negotiation goes on.
//     The export name must equal Options::export_name; the empty name is the default export and
//     names it too. A wrong name gets NBD_REP_ERR_UNKNOWN (GO/INFO) or a closed connection
//     (EXPORT_NAME, which cannot answer an error). GO/INFO send NBD_INFO_EXPORT and, when the
//     client asks, NBD_INFO_BLOCK_SIZE (min 1, preferred 4096, max Options::max_payload) and
//     NBD_INFO_NAME;
//   * transmission flags HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES (never
//     READ_ONLY, MULTI_CONN, CACHE, FAST_ZERO, DF);
//   * simple replies only, sent in request order (requests are processed one at a time);
//   * commands READ, WRITE, TRIM, WRITE_ZEROES (flag FUA accepted on every command, NO_HOLE on
//     WRITE_ZEROES), FLUSH, DISC. CACHE (not advertised), BLOCK_STATUS, any unknown type and any
//     other flag bit are answered EINVAL and the connection stays usable.
//
// Rejected requests never reach the Backend: out of range (offset+length > size, or overflow)
// -> EINVAL (READ/TRIM/WRITE_ZEROES) or ENOSPC (WRITE, whose payload is read and discarded
// first); length 0 on READ/WRITE/TRIM/WRITE_ZEROES -> EINVAL; READ longer than max_payload ->
// EINVAL. A WRITE longer than max_payload cannot be skipped safely: the connection is closed.
// Bad magic, a short read or a hang-up closes the connection; the listener then accepts the
// next client. Every rejection is logged (component "nbd") with the socket path.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <thread>

#include "common/fd.h"

namespace ftvm::vmm::nbd {

// The storage behind the export. Errors are NBD error values (0 = ok; EPERM, EIO, ENOMEM,
// EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN); the server sends them to the client as they
// are (any other value is logged and sent as EIO; an exception is logged and sent as EIO).
// Called on the server thread only, one request at a time, in wire order, and only with ranges
// already checked against size(): offset + length <= size(), length > 0.
class Backend {
 public:
  virtual ~Backend() = default;
  // Export size in bytes; read once per connection when the client enters transmission.
  virtual uint64_t size() const = 0;
  // Fills `out` (all of it) with the bytes at `offset`.
  virtual int read(uint64_t offset, std::span<std::byte> out) = 0;
  // Stores `data` at `offset`; with `fua` the data is durable before this returns.
  virtual int write(uint64_t offset, std::span<const std::byte> data, bool fua) = 0;
  // Makes the range read as zeros; `no_hole` forbids deallocating it.
  virtual int write_zeroes(uint64_t offset, uint64_t length, bool no_hole) = 0;
  // The client no longer needs the range (its content afterwards is unspecified by NBD).
  virtual int trim(uint64_t offset, uint64_t length) = 0;
  // Every write completed before this call is durable when it returns 0.
  virtual int flush() = 0;
};

// A Backend over a file descriptor open read-write (regular file or block device): pread /
// pwrite, FUA and flush by fdatasync, write_zeroes (no_hole=false) and trim by
// fallocate(PUNCH_HOLE|KEEP_SIZE), write_zeroes(no_hole=true) by fallocate(ZERO_RANGE|KEEP_SIZE);
// where fallocate is not supported it falls back to writing zeros (and remembers that). So after
// trim or write_zeroes the range always reads as zeros. The size is fixed at construction.
class FileBackend : public Backend {
 public:
  // Takes `fd`; `name` (a path) appears in messages. Throws ftvm::SysError naming `name` when
  // the size cannot be read.
  FileBackend(UniqueFd fd, std::string name);

  uint64_t size() const override { return size_; }
  int read(uint64_t offset, std::span<std::byte> out) override;
  int write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  int write_zeroes(uint64_t offset, uint64_t length, bool no_hole) override;
  int trim(uint64_t offset, uint64_t length) override;
  int flush() override;

 private:
  int write_zero_bytes(uint64_t offset, uint64_t length);
  int fallocate_or_zero(int mode, bool& supported, uint64_t offset, uint64_t length);

  UniqueFd fd_;
  std::string name_;
  uint64_t size_ = 0;
  bool punch_supported_ = true;
  bool zero_range_supported_ = true;
};

struct Options {
  std::string export_name = "ftvm";
  // Largest READ/WRITE payload (advertised as the maximum block size). At least 4096.
  uint32_t max_payload = 32u << 20;
  pid_t allowed_pid = 0;                  // SO_PEERCRED pid that may connect; 0 = any
  uid_t allowed_uid = static_cast<uid_t>(-1);   // SO_PEERCRED uid that may connect; -1 = any
  uid_t socket_owner = static_cast<uid_t>(-1);  // chown the socket to this uid; -1 = leave
};

struct Stats {
  uint64_t requests = 0;     // transmission requests received (valid or not)
  uint64_t writes = 0;       // NBD_CMD_WRITE requests the backend completed with success
  uint64_t write_bytes = 0;  // their payload bytes
  uint64_t errors = 0;       // error replies sent + connections closed for a protocol violation
  uint64_t connections = 0;  // clients accepted past the credential and one-client checks
  bool connected = false;    // a client is being served now
  std::string last_error;    // the latest of those errors, as logged ("" when none)
};

// Serves one export to one client at a time on its own thread.
class Server {
 public:
  // Creates the unix socket at `socket_path` (an existing socket file there is replaced, any
  // other file is left alone and is an error), mode 0600, chowned to opts.socket_owner when set,
  // and listens. Clients may connect at once; they are served after start(). Throws
  // ftvm::SysError/Error naming the path on failure, ftvm::Error on invalid options.
  Server(std::string socket_path, Backend& backend, Options opts);
  // stop(), then closes the sockets and unlinks the socket path (only while it is still the
  // socket this server created: a newer server's socket at the same path is left alone).
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts the server thread (once). The thread never throws: a failure on a connection is
  // logged and that connection closed; the listener keeps accepting.
  void start();
  // Stops the thread and closes the current client; a request in progress in the backend is
  // finished first. Idempotent; must not be called from the backend.
  void stop();
  // Test/fault hook: shuts the current client connection down (the client sees EOF; the server
  // thread notices, closes it and accepts a new client). Returns false when no client was
  // connected. Thread-safe.
  bool drop_client();
  // A consistent snapshot of the counters. Thread-safe.
  Stats stats() const;
  const std::string& path() const { return path_; }

 private:
  void run() noexcept;
  // Accepts one pending connection; returns it when it may be served (no client connected,
  // credentials allowed), otherwise logs why and closes it. Server thread only.
  UniqueFd accept_one();
  void serve(UniqueFd client);
  void note_error(const std::string& msg);

  friend class Connection;

  std::string path_;
  dev_t sock_dev_ = 0;  // identity of the socket file created at path_
  ino_t sock_ino_ = 0;
  Backend& backend_;
  Options opts_;
  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // eventfd; readable once stop() was called
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::string peer_;  // "pid N uid M" of the client being served (server thread only)

  mutable std::mutex mu_;  // guards client_fd_ (against close/shutdown races) and stats_
  int client_fd_ = -1;
  Stats stats_;
};

}  // namespace ftvm::vmm::nbd
