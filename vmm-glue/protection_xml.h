// The ftvm protection element in a libvirt domain XML: the one parser and writer, used by ftd
// (start-up scan, `ftctl enable DOMAIN`), ftctl and the libvirt hook. libxml2 only: no libvirt
// calls, no filesystem, so the hook (which must never call back into libvirtd) links it
// (CMake target ftvm_protection_xml).
//
// A protected domain carries in its <metadata>:
//   <ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1"
//                    peer="HOST[:PORT]" transport="auto|tcp|rdma" epoch-ms="25" failover="auto|manual"
//                    [arbiter="KIND"] [peer-alt="HOST[:PORT]"] [reprotect="auto|manual"]/>
// Attributes (any other attribute is refused: a typo would otherwise be ignored):
//   peer       the standby host's ftd, "host", "host:port", "[v6]:port" or a bare IPv6 address
//              (required; port 7410 by default)
//   transport  auto (RDMA when the peer is reachable over an RDMA device), tcp or rdma; default auto
//   epoch-ms   guest run time between checkpoints, an integer in 1..10000; default 25
//   failover   auto: the standby resumes the twin when the primary is lost; manual: it waits for
//              `ftctl failover --force`; default auto
//   arbiter    this VM's split-brain arbiter (none, fence-command, corosync, sanlock); default the
//              host's (ftd --arbiter)
//   peer-alt   the standby's address on a second network (its --listen-also); default none
//   reprotect  after a failover: auto = the new primary protects the VM again towards the old
//              host as soon as it can; manual = only `ftctl enable` on the new host does;
//              default auto
#pragma once

#include <optional>
#include <string>

namespace ftvm::vmm {

constexpr const char* kProtectionNs = "https://ftvm.dev/xmlns/protection/1";
constexpr const char* kProtectionPrefix = "ftvm";  // the `key` for virDomainSetMetadata

struct Protection {
  std::string peer;                // standby ftd: "host", "host:port", "[v6]:port" (required)
  std::string transport = "auto";  // auto | tcp | rdma
  unsigned epoch_ms = 25;          // 1..10000
  std::string failover = "auto";   // auto | manual (EnableRequest::failover)
  std::string arbiter = "";        // "" = the host's (ftd --arbiter); "none" = this VM opts out
  std::string peer_alt = "";       // the standby's second address (another network); "" = none
  std::string reprotect = "auto";  // auto | manual (EnableRequest::reprotect)

  bool operator==(const Protection&) const = default;
};

// What is wrong with `p`, or nullopt when it is valid: the first problem found, naming the
// attribute, the value and the accepted values ("transport='udp' is not accepted (use auto, tcp
// or rdma)"), without the "ftvm protection: " prefix the throwing functions add. Checks: peer
// present, no spaces, quotes, slashes or control characters, a port in 1..65535 when given, a
// closed '[...]' for IPv6; transport auto|tcp|rdma; epoch-ms in 1..10000; failover and reprotect
// auto|manual; arbiter lower-case letters and '-' (at most 32); peer-alt HOST[:PORT] characters.
std::optional<std::string> protection_problem(const Protection& p);

// Reads the protection element from either
//  * a whole domain XML: the child of <domain><metadata> in namespace kProtectionNs (any
//    prefix); absent -> std::nullopt; or
//  * the string virDomainGetMetadata returns for kProtectionNs: just the element, which libvirt
//    hands back with its namespace stripped (`<protection peer=.../>`, sometimes with a dangling
//    `ftvm:` prefix); any root element named `protection` is taken as that element.
// Throws xml::MalformedXml (an ftvm::Error) for input that is not XML, and ftvm::Error for a
// present but invalid element ("ftvm protection: " + protection_problem(), or the unknown
// attribute, or "two <ftvm:protection> elements"), for a root that is neither <domain> nor
// <protection>, and for a <protection> root in another namespace.
std::optional<Protection> parse_protection(const std::string& xml);

// The snippet to pass to virDomainSetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, snippet,
// kProtectionPrefix, kProtectionNs, flags): `<protection peer="..." transport="..."
// epoch-ms="..." failover="..."/>`, plus arbiter, peer-alt and reprotect only when they differ
// from their defaults (an older ftd refuses attributes it does not know). It deliberately
// carries NO xmlns: libvirt moves the element into `uri` with prefix `key` itself and refuses a
// snippet that already declares that prefix ("internal error: failed to create a new XML
// namespace"); the domain XML then holds
// `<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" .../>`.
// Validates `p` like parse_protection (throws ftvm::Error).
std::string protection_element(const Protection& p);

// The same element, namespaced and self-contained, for writing into a domain XML by hand
// (`<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" .../>`).
std::string protection_element_qualified(const Protection& p);

// What the libvirt hook needs from the domain XML libvirt passes it.
struct DomainDeclaration {
  bool is_domain = false;     // the root is an unnamespaced <domain>; when false only `root` is set
  std::string root;           // the root element's name as written (for messages)
  std::string name, uuid;     // the first <name> and <uuid>, surrounding whitespace trimmed
  bool has_element = false;   // <metadata> holds an element in kProtectionNs named protection
  std::optional<Protection> protection;  // set when has_element and it is valid
  std::string invalid;        // when has_element and not valid: why (protection_problem() wording)
};

// Reads a whole domain XML without throwing on what the domain declares: an invalid protection
// element is reported in `invalid`, a non-domain root in `is_domain`/`root`. Throws
// xml::MalformedXml for input that is not XML (empty, too large, not well-formed).
DomainDeclaration read_domain_declaration(const std::string& domain_xml);

// True when `s` is a UUID in libvirt's string form (8-4-4-4-12 hex digits, or 32 hex digits).
bool looks_like_uuid(const std::string& s);

}  // namespace ftvm::vmm
