// The control socket: a unix stream socket (mode 0600 in a 0700 directory; peers must be root
// or ftd's own uid) carrying one JSON object per line in each direction.
//
// Request:  {"cmd": "enable"|"status"|"failover"|"disable"|"fault"|"ping", ...arguments}
// Response: {"ok": true, ...} or {"ok": false, "code": CODE, "error": "what failed and what to do"}
// CODE is one of "bad_request" (malformed or unknown input), "not_found" (no such VM),
// "refused" (the VM cannot be protected / wrong state), "failed" (the operation was attempted
// and failed). ftctl maps these to exit codes (see tools/ftctl/main.cc).
#pragma once

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/fd.h"

namespace ftvm::ftd {

inline constexpr size_t kMaxControlLine = 1 << 20;

// Creates the listening socket at `path` (replacing a stale one; refusing if a live ftd
// answers there).
UniqueFd listen_control(const std::string& path);

// Serves one accepted client until it disconnects: reads request lines, answers each with
// `handler`. Malformed lines get a bad_request answer; the connection stays usable.
void serve_control_client(UniqueFd client, const std::function<nlohmann::json(const nlohmann::json&)>& handler);

// Client side (ftctl, tests): sends one request and returns the response. Throws ftvm::Error
// when ftd cannot be reached or answers garbage.
nlohmann::json control_call(const std::string& path, const nlohmann::json& req, int timeout_ms);

}  // namespace ftvm::ftd
