#include "tools/ftd/history.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "common/log.h"
#include "tools/ftd/session.h"

namespace ftvm::ftd {

namespace {
std::mutex g_node_mu;
std::string g_node = "unknown";

void trim(nlohmann::json& a) {
  if (a.size() > History::kMaxEvents) a.erase(a.begin(), a.begin() + static_cast<long>(a.size() - History::kMaxEvents));
}
}  // namespace

void History::set_node_name(const std::string& listen) {
  char h[256] = {};
  std::string host = ::gethostname(h, sizeof h - 1) == 0 ? std::string(h) : std::string("unknown-host");
  std::lock_guard<std::mutex> g(g_node_mu);
  g_node = listen.empty() ? host : host + "@" + listen;
}

std::string History::node_name() {
  std::lock_guard<std::mutex> g(g_node_mu);
  return g_node;
}

History::History(std::string state_dir, std::string vm) : state_dir_(std::move(state_dir)), vm_(std::move(vm)) {
  const auto path = state_dir_ + "/history/" + vm_ + ".json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return;
  try {
    std::ifstream f(path);
    auto j = nlohmann::json::parse(f);
    if (!j.is_array()) throw Error("not a JSON array");
    trim(j);
    events_ = std::move(j);
  } catch (const std::exception& e) {
    log::warn("ftd", "{}: ignoring the unreadable history {} ({}); a new history starts", vm_, path, e.what());
  }
}

void History::append(nlohmann::json event) {
  if (!event.contains("wall_ms")) event["wall_ms"] = wall_ms();
  if (!event.contains("host")) event["host"] = node_name();
  std::lock_guard<std::mutex> g(mu_);
  events_.push_back(std::move(event));
  trim(events_);
  save_locked();
}

void History::adopt(const std::string& events_json) {
  if (events_json.empty()) return;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(events_json);
  } catch (const std::exception& e) {
    log::warn("ftd", "{}: the history received from the primary does not parse ({}); keeping this host's", vm_,
              e.what());
    return;
  }
  if (!j.is_array()) {
    log::warn("ftd", "{}: the history received from the primary is not a JSON array; keeping this host's", vm_);
    return;
  }
  trim(j);
  std::lock_guard<std::mutex> g(mu_);
  events_ = std::move(j);
  save_locked();
}

nlohmann::json History::events() const {
  std::lock_guard<std::mutex> g(mu_);
  return events_;
}

std::string History::dump() const {
  std::lock_guard<std::mutex> g(mu_);
  auto j = events_;
  auto text = j.dump();
  while (text.size() > 60000 && !j.empty()) {  // OpenSession carries at most 64 KiB
    j.erase(j.begin());
    text = j.dump();
  }
  return text;
}

void History::save_locked() const {
  if (state_dir_.empty()) return;
  const auto dir = state_dir_ + "/history";
  const auto path = dir + "/" + vm_ + ".json";
  try {
    std::filesystem::create_directories(dir);
    const auto tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::trunc);
      f << events_.dump() << "\n";
      if (!f) throw Error("write " + tmp + " failed");
    }
    std::filesystem::rename(tmp, path);
  } catch (const std::exception& e) {
    log::error("ftd", "{}: saving the VM's history to {} failed ({}); `ftctl status` keeps showing it until ftd "
               "restarts; check that --state-dir {} is writable", vm_, path, e.what(), state_dir_);
  }
}

}  // namespace ftvm::ftd
