// The control protocol between ftd and its local clients (ftctl, the libvirt hook, tests): the
// one implementation of the wire framing, the client, the server loop and the request/response
// types (CMake target ftvm_control; it does not link the daemon).
//
// Transport: a unix stream socket (mode 0600 in a 0700 directory; peers must be root or ftd's
// own uid) carrying one JSON object per line in each direction, at most kMaxLine bytes a line.
//
// Request:  {"cmd": "enable"|"status"|"failover"|"disable"|"fault"|"ping"|"hook", ...arguments}
// Response: {"ok": true, ...} or {"ok": false, "code": CODE, "error": "what failed and what to do"}
// CODE is one of "bad_request" (malformed or unknown input), "not_found" (no such VM),
// "refused" (the VM cannot be protected / wrong state), "failed" (the operation was attempted
// and failed), "wait" (the arbiter cannot tell yet; retry). ftctl maps these to its exit codes
// (exit_code()).
//
// The hook's request (HookRequest): {"cmd":"hook","phase":P,"domain":NAME,"uuid":UUID} for the
// phases stopped/release, plus "protection":{"peer":..,"transport":..,"epoch_ms":N,"failover":..
// [,"arbiter":..][,"peer_alt":..][,"reprotect":"manual"]} for started/reconnect: the domain's
// protection element (vmm-glue/protection_xml.h), optional members only when not the default.
#pragma once

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "vmm-glue/protection_xml.h"

namespace ftvm::control {

inline constexpr const char* kDefaultSocket = "/run/ftvm/ftd.sock";
inline constexpr size_t kMaxLine = 1 << 20;

// ---- responses ---------------------------------------------------------------------------------

// Why a request failed (the response's "code").
enum class Code { BadRequest, NotFound, Refused, Failed, Wait };

// The wire name of `c` ("bad_request", ...).
std::string_view code_name(Code c);

// The Code named `name`; nullopt for anything else (an unknown code from a newer ftd).
std::optional<Code> parse_code(std::string_view name);

// {"ok": false, "code": code_name(c), "error": msg}.
nlohmann::json error_response(Code c, const std::string& msg);

// True when `resp` is an object whose "ok" is the boolean true.
bool response_ok(const nlohmann::json& resp);

// ftctl's exit codes (stable; for scripts and cluster resource agents).
enum Exit : int {
  kExitOk = 0,           // success
  kExitFailed = 1,       // the operation failed
  kExitUsage = 2,        // usage error / bad request
  kExitUnreachable = 3,  // ftd unreachable
  kExitNotFound = 4,     // no such VM
  kExitRefused = 5,      // refused (VM cannot be protected, or wrong state)
  kExitWait = 6,         // not now: the arbiter cannot tell yet (`failover --force`); retry
};

// The exit code for a failed response: bad_request 2, not_found 4, refused 5, wait 6, anything
// else (failed, missing or unknown code) 1.
int exit_code(const nlohmann::json& resp);

// ---- framing -----------------------------------------------------------------------------------

// `msg` as one line on the wire: compact JSON, invalid UTF-8 replaced (U+FFFD), then '\n'.
std::string frame(const nlohmann::json& msg);
std::string frame(const nlohmann::ordered_json& msg);

// Splits a byte stream into lines. Not thread-safe (one reader per connection).
class LineReader {
 public:
  explicit LineReader(size_t max_line = kMaxLine) : max_(max_line) {}
  // Appends received bytes.
  void feed(const char* data, size_t n) { buf_.append(data, n); }
  // The next complete line without its '\n', or nullopt when none is complete yet.
  std::optional<std::string> next();
  // True when the incomplete tail is longer than max_line: the peer broke the framing.
  bool overflow() const { return buf_.size() > max_; }

 private:
  std::string buf_;
  size_t max_;
};

// ---- client ------------------------------------------------------------------------------------

// How far one exchange got, and why it stopped there.
struct CallResult {
  bool connected = false;  // connect() to ftd's socket succeeded
  bool sent = false;   // the whole request line reached ftd's socket
  std::string reply;   // ftd's answer line (without '\n'); empty when it did not answer
  int sys_errno = 0;   // the errno of a failed system call (connect, send), 0 otherwise
  std::string error;   // when not answered: what failed, e.g. "connect: No such file or directory",
                       // "ftd at PATH did not answer within N ms", "ftd at PATH closed the
                       // connection without an answer", "ftd at PATH sent an oversized answer"
};

// Sends `line` (framed, ending in '\n') to the ftd listening at `path` and reads one answer line
// of at most `max_reply` bytes, all within `timeout_ms` (connect, send and receive together;
// the socket is non-blocking, a full backlog is retried until the deadline). Never throws for
// anything ftd or the socket does; every outcome is in the result. Blocks the calling thread
// up to timeout_ms; safe to call from several threads at once. SIGPIPE is not raised (the
// send uses MSG_NOSIGNAL).
CallResult call_line(const std::string& path, const std::string& line, int timeout_ms, size_t max_reply = kMaxLine);

// ftctl's call: sends `req` and returns ftd's answer object. Throws ftvm::SysError when ftd
// cannot be reached (connect or send failed: ftctl exits kExitUnreachable) and ftvm::Error
// when it does not answer within timeout_ms, closes without an answer, or answers something
// that is not one JSON object.
nlohmann::json call(const std::string& path, const nlohmann::json& req, int timeout_ms);

// ---- server ------------------------------------------------------------------------------------

using Handler = std::function<nlohmann::json(const nlohmann::json&)>;

// Creates the listening socket at `path` (mode 0600; replacing a stale socket file, refusing
// with ftvm::Error when a live ftd answers there). Throws ftvm::SysError naming the call that
// failed (a path longer than a sockaddr_un holds: ftvm::Error).
UniqueFd listen_control(const std::string& path);

// Serves one accepted client until it disconnects: reads request lines and answers each with
// handler(request), in order, one line per request. A peer that is neither root nor ftd's uid
// gets one "refused" answer and is closed; a line that is not a JSON object gets a bad_request
// answer (the connection stays usable); a line longer than kMaxLine gets a bad_request answer
// and the connection is closed. `handler` must not throw (ftd's handle() maps exceptions to
// responses). Runs on the calling thread; returns when the client closes or a send fails.
void serve_control_client(UniqueFd client, const Handler& handler);

// ---- the hook's request ------------------------------------------------------------------------

struct HookRequest {
  std::string phase;                          // libvirt's hook phase (started, reconnect, stopped, release)
  std::string domain;                         // the domain's name
  std::string uuid;                           // its UUID as the domain XML writes it ("" = unknown)
  std::optional<vmm::Protection> protection;  // started/reconnect: the declared protection
};

// The request line's object, members in the order of the header comment (ordered for logs and
// exact comparison in tests).
nlohmann::ordered_json encode_hook_request(const HookRequest& r);

// The request `req` (a hook request as ftd received it). Throws std::invalid_argument (ftd
// answers bad_request) when phase or domain is missing or not a non-empty string, when
// "protection" is present but not an object, lacks peer, has a member of the wrong type, or
// fails vmm::protection_problem() (the message names the member and the accepted values).
HookRequest decode_hook_request(const nlohmann::json& req);

}  // namespace ftvm::control
