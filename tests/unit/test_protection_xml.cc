// The protection element's one parser (vmm-glue/protection_xml.h: reprotect=, the hook's
// read_domain_declaration) and the control library (tools/control/control.h: the hook's
// request, exit codes, a real client/server exchange over a unix socket).
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "tools/control/control.h"
#include "vmm-glue/protection_xml.h"
#include "vmm-glue/xml_doc.h"

using namespace ftvm;
using namespace ftvm::vmm;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

std::string domain_with(const std::string& attrs) {
  return "<domain type='kvm'>\n  <name> vm1 </name>\n  <uuid>4a0f2c3e-9b1d-4e6f-8a2b-1c3d5e7f9a0b</uuid>\n"
         "  <metadata><ftvm:protection xmlns:ftvm='https://ftvm.dev/xmlns/protection/1' " +
         attrs + "/></metadata>\n</domain>\n";
}

}  // namespace

TEST_CASE("protection element: reprotect= is read, validated and written", "[libvirt][protection]") {
  CHECK(parse_protection("<protection peer='h'/>")->reprotect == "auto");  // the default
  CHECK(parse_protection("<protection peer='h' reprotect='manual'/>")->reprotect == "manual");
  CHECK(parse_protection("<protection peer='h' reprotect='auto'/>")->reprotect == "auto");
  CHECK(parse_protection(domain_with("peer='h' reprotect='manual'"))->reprotect == "manual");
  const std::string bad = error_of([] { parse_protection("<protection peer='h' reprotect='sometimes'/>"); });
  CHECK_THAT(bad, Catch::Contains("reprotect='sometimes'") && Catch::Contains("auto") && Catch::Contains("manual"));
  CHECK_THAT(bad, Catch::StartsWith("ftvm protection: "));
  // Written only when not the default (an older ftd refuses attributes it does not know).
  Protection p{"h"};
  CHECK(protection_element(p).find("reprotect") == std::string::npos);
  p.reprotect = "manual";
  CHECK_THAT(protection_element(p), Catch::Contains("reprotect=\"manual\""));
  CHECK(parse_protection(protection_element(p)) == p);
  CHECK(parse_protection("<domain><metadata>" + protection_element_qualified(p) + "</metadata></domain>") == p);
  p.reprotect = "never";
  CHECK_THROWS_WITH(protection_element(p), Catch::Contains("reprotect='never'"));
  CHECK(protection_problem(Protection{"h"}) == std::nullopt);
}

TEST_CASE("protection element: the hook's reading of a whole domain XML", "[libvirt][protection]") {
  auto d = read_domain_declaration(domain_with("peer='standby:7410' reprotect='manual' epoch-ms='40'"));
  CHECK(d.is_domain);
  CHECK(d.name == "vm1");  // trimmed
  CHECK(d.uuid == "4a0f2c3e-9b1d-4e6f-8a2b-1c3d5e7f9a0b");
  REQUIRE(d.has_element);
  REQUIRE(d.protection);
  CHECK(d.protection->reprotect == "manual");
  CHECK(d.protection->epoch_ms == 40);

  // Invalid: reported, not thrown, in the same words as ftd's parser (without its prefix).
  d = read_domain_declaration(domain_with("peer='h' reprotect='later'"));
  CHECK(d.has_element);
  CHECK_FALSE(d.protection);
  CHECK_THAT(d.invalid, Catch::StartsWith("reprotect='later' is not accepted") && Catch::Contains("manual"));
  d = read_domain_declaration(domain_with("peer='h' epoch-ms='0'"));
  CHECK_THAT(d.invalid, Catch::Contains("epoch-ms='0' is not an integer in 1..10000"));
  d = read_domain_declaration(domain_with("peer='h' epoch_ms='5'"));
  CHECK_THAT(d.invalid, Catch::Contains("unknown attribute epoch_ms"));

  // No element / another namespace's element / not a domain / not XML.
  d = read_domain_declaration("<domain><name>x</name><metadata><p:protection xmlns:p='urn:x' peer='h'/>"
                              "</metadata></domain>");
  CHECK(d.is_domain);
  CHECK_FALSE(d.has_element);
  d = read_domain_declaration("<network><name>default</name></network>");
  CHECK_FALSE(d.is_domain);
  CHECK(d.root == "network");
  try {
    read_domain_declaration("<domain><name>");
    FAIL("no exception");
  } catch (const xml::MalformedXml& e) {
    CHECK(e.line() == 1);
    CHECK_FALSE(e.detail().empty());
  }
}

TEST_CASE("control: the hook's request carries the protection element", "[control]") {
  control::HookRequest h{"started", "vm1", "u-1", Protection{"standby:7410", "tcp", 40}};
  CHECK(control::frame(control::encode_hook_request(h)) ==
        R"({"cmd":"hook","phase":"started","domain":"vm1","uuid":"u-1",)"
        R"("protection":{"peer":"standby:7410","transport":"tcp","epoch_ms":40,"failover":"auto"}})"
        "\n");
  h.protection->reprotect = "manual";
  h.protection->peer_alt = "10.1.0.2";
  const auto line = control::frame(control::encode_hook_request(h));
  CHECK_THAT(line, Catch::EndsWith(R"("peer_alt":"10.1.0.2","reprotect":"manual"}})"
                                   "\n"));
  const auto back = control::decode_hook_request(nlohmann::json::parse(line));
  CHECK(back.phase == "started");
  CHECK(back.uuid == "u-1");
  REQUIRE(back.protection);
  CHECK(*back.protection == *h.protection);

  // Short form; malformed requests are std::invalid_argument (ftd: bad_request).
  CHECK_FALSE(control::decode_hook_request({{"phase", "stopped"}, {"domain", "vm1"}}).protection);
  CHECK_THROWS_AS(control::decode_hook_request({{"domain", "vm1"}}), std::invalid_argument);
  CHECK_THROWS_WITH(control::decode_hook_request(
                        {{"phase", "started"}, {"domain", "vm1"}, {"protection", {{"peer", "h"}, {"reprotect", "x"}}}}),
                    Catch::Contains("reprotect='x'"));
  CHECK_THROWS_WITH(
      control::decode_hook_request({{"phase", "started"}, {"domain", "vm1"}, {"protection", {{"transport", "tcp"}}}}),
      Catch::Contains("peer"));
}

TEST_CASE("control: response codes map to ftctl's exit codes", "[control]") {
  using control::Code;
  for (Code c : {Code::BadRequest, Code::NotFound, Code::Refused, Code::Failed, Code::Wait})
    CHECK(control::parse_code(control::code_name(c)) == c);
  CHECK(control::exit_code(control::error_response(Code::BadRequest, "x")) == 2);
  CHECK(control::exit_code(control::error_response(Code::NotFound, "x")) == 4);
  CHECK(control::exit_code(control::error_response(Code::Refused, "x")) == 5);
  CHECK(control::exit_code(control::error_response(Code::Wait, "x")) == 6);
  CHECK(control::exit_code(control::error_response(Code::Failed, "x")) == 1);
  CHECK(control::exit_code({{"ok", false}, {"code", "from-the-future"}}) == 1);
  CHECK(control::response_ok({{"ok", true}}));
  CHECK_FALSE(control::response_ok({{"ok", "true"}}));
}

TEST_CASE("control: client and server over a real unix socket", "[control]") {
  char tmpl[] = "/tmp/ftvm-ctl-XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  const std::string dir = tmpl, path = dir + "/ftd.sock";
  {
    UniqueFd l = control::listen_control(path);
    std::thread server([&] {
      UniqueFd c(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      control::serve_control_client(std::move(c), [](const nlohmann::json& req) {
        if (req.value("cmd", "") == "ping") return nlohmann::json{{"ok", true}, {"echo", req.value("x", 0)}};
        return control::error_response(control::Code::NotFound, "no VM named 'x'");
      });
    });
    auto r = control::call(path, {{"cmd", "ping"}, {"x", 7}}, 5000);
    CHECK(control::response_ok(r));
    CHECK(r["echo"] == 7);
    server.join();
    CHECK_THROWS_WITH(control::listen_control(path), Catch::Contains("another ftd already serves"));
  }
  // Nobody listens: the socket file is gone (ftd removes it) -> unreachable (SysError).
  std::filesystem::remove(path);
  CHECK_THROWS_AS(control::call(path, {{"cmd", "ping"}}, 1000), SysError);
  auto res = control::call_line(path, "{}\n", 1000);
  CHECK_FALSE(res.sent);
  CHECK(res.error == "connect: No such file or directory");
  // A listener that never answers: the deadline holds.
  {
    UniqueFd l = control::listen_control(path);
    auto t0 = std::chrono::steady_clock::now();
    res = control::call_line(path, "{\"cmd\":\"ping\"}\n", 200);
    CHECK(res.sent);
    CHECK(res.reply.empty());
    CHECK_THAT(res.error, Catch::Contains("did not answer within 200 ms"));
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  }
  std::filesystem::remove_all(dir);
}
