#include "vmm-glue/protection_xml.h"

#include <algorithm>
#include <cctype>
#include <vector>

#include <fmt/format.h>
#include <libxml/tree.h>

#include "common/error.h"
#include "vmm-glue/xml_doc.h"

namespace ftvm::vmm {

namespace {

std::string S(const xmlChar* s) { return s ? reinterpret_cast<const char*>(s) : ""; }

bool is_elem(xmlNode* n, const char* name) {
  return n && n->type == XML_ELEMENT_NODE && n->ns == nullptr && S(n->name) == name;
}
bool in_ns(xmlNode* n, const char* href, const char* name) {
  return n && n->type == XML_ELEMENT_NODE && n->ns && n->ns->href && S(n->ns->href) == href && S(n->name) == name;
}

std::string escape_attr(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&apos;"; break;
      case '\n': o += "&#10;"; break;
      case '\t': o += "&#9;"; break;
      case '\r': o += "&#13;"; break;
      default: o += c;
    }
  }
  return o;
}

bool all_digits(const std::string& s) { return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos; }

std::optional<std::string> port_problem(const std::string& peer, const std::string& port) {
  if (!all_digits(port) || port.size() > 5 || std::stoul(port) < 1 || std::stoul(port) > 65535)
    return fmt::format("peer='{}': port '{}' is not a number in 1..65535 (write peer='HOST' or peer='HOST:PORT', "
                       "IPv6 as '[ADDR]:PORT')",
                       peer, port);
  return std::nullopt;
}

std::string epoch_ms_problem(const std::string& v) {
  return fmt::format("epoch-ms='{}' is not an integer in 1..10000 (use 1 to 10000 milliseconds; default 25)", v);
}

std::string protection_attrs(const Protection& p) {
  if (auto why = protection_problem(p)) fail("ftvm protection: {}", *why);
  return fmt::format("peer=\"{}\" transport=\"{}\" epoch-ms=\"{}\" failover=\"{}\"{}{}{}", escape_attr(p.peer),
                     escape_attr(p.transport), p.epoch_ms, escape_attr(p.failover),
                     p.arbiter.empty() ? "" : " arbiter=\"" + escape_attr(p.arbiter) + "\"",
                     p.peer_alt.empty() ? "" : " peer-alt=\"" + escape_attr(p.peer_alt) + "\"",
                     p.reprotect == "auto" ? "" : " reprotect=\"" + escape_attr(p.reprotect) + "\"");
}

std::string local_name(xmlNode* n) {
  std::string s = S(n->name);
  size_t c = s.find(':');  // an unbound prefix stays in the name ("ftvm:protection")
  return c == std::string::npos ? s : s.substr(c + 1);
}

// The element's attributes as a Protection, or the first problem (without the prefix).
std::optional<std::string> read_protection(xmlNode* e, Protection& p) {
  p = Protection{};
  bool have_peer = false;
  for (xmlAttr* a = e->properties; a; a = a->next) {
    std::string name = S(a->name);
    xmlChar* raw = xmlNodeListGetString(e->doc, a->children, 1);
    std::string v = S(raw);
    xmlFree(raw);
    if (name == "peer") {
      p.peer = v;
      have_peer = true;
    } else if (name == "transport") {
      p.transport = v;
    } else if (name == "failover") {
      p.failover = v;
    } else if (name == "arbiter") {
      p.arbiter = v;
    } else if (name == "peer-alt") {
      p.peer_alt = v;
    } else if (name == "reprotect") {
      p.reprotect = v;
    } else if (name == "epoch-ms") {
      if (!all_digits(v) || v.size() > 6) return epoch_ms_problem(v);
      p.epoch_ms = static_cast<unsigned>(std::stoul(v));
    } else {
      return fmt::format("unknown attribute {}='{}' (accepted: peer, transport, epoch-ms, failover, arbiter, "
                         "peer-alt, reprotect)",
                         name, v);
    }
  }
  if (!have_peer) p.peer.clear();
  return protection_problem(p);
}

Protection read_protection_or_throw(xmlNode* e) {
  Protection p;
  if (auto why = read_protection(e, p)) fail("ftvm protection: {}", *why);
  return p;
}

// The protection elements of <domain><metadata> (kProtectionNs, any prefix).
std::vector<xmlNode*> protection_elements(xmlNode* domain) {
  std::vector<xmlNode*> out;
  for (xmlNode* c = domain->children; c; c = c->next) {
    if (!is_elem(c, "metadata")) continue;
    for (xmlNode* m = c->children; m; m = m->next)
      if (in_ns(m, kProtectionNs, "protection")) out.push_back(m);
    break;  // the first <metadata> (libvirt writes one)
  }
  return out;
}

std::string two_elements_problem() {
  return fmt::format("two <ftvm:protection> elements in <metadata> (keep one: `virsh metadata DOMAIN {} --remove` "
                     "clears them)",
                     kProtectionNs);
}

std::string trimmed_text(xmlNode* n) {
  xmlChar* c = xmlNodeGetContent(n);
  std::string s = S(c);
  if (c) xmlFree(c);
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace

std::optional<std::string> protection_problem(const Protection& p) {
  if (p.peer.empty())
    return std::string("attribute peer is missing or empty (write peer='HOST[:PORT]': the standby host's ftd)");
  for (unsigned char c : p.peer)
    if (c <= ' ' || c == 0x7f || c == '/' || c == '\'' || c == '"')
      return fmt::format("peer='{}' contains a space, quote, slash or control character (write peer='HOST[:PORT]')",
                         p.peer);
  if (p.peer.front() == '[') {
    size_t close = p.peer.find(']');
    if (close == std::string::npos || close == 1)
      return fmt::format("peer='{}': unterminated or empty IPv6 '[ADDR]' (write peer='[ADDR]:PORT')", p.peer);
    std::string rest = p.peer.substr(close + 1);
    if (!rest.empty()) {
      if (rest[0] != ':') return fmt::format("peer='{}': expected ':PORT' after ']' (write peer='[ADDR]:PORT')", p.peer);
      if (auto why = port_problem(p.peer, rest.substr(1))) return why;
    }
  } else if (size_t c = p.peer.find(':'); c != std::string::npos && p.peer.find(':', c + 1) == std::string::npos) {
    if (c == 0) return fmt::format("peer='{}': the host is empty (write peer='HOST[:PORT]')", p.peer);
    if (auto why = port_problem(p.peer, p.peer.substr(c + 1))) return why;
  }  // otherwise a host name, IPv4 address or bare IPv6 address without a port
  if (!p.peer_alt.empty() &&
      (p.peer_alt.size() > 255 || !std::all_of(p.peer_alt.begin(), p.peer_alt.end(), [](char c) {
         return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == ':' || c == '-' || c == '[' ||
                c == ']' || c == '_';
       })))
    return fmt::format("peer-alt='{}' is not HOST[:PORT] (the standby's address on a second network)", p.peer_alt);
  if (p.transport != "auto" && p.transport != "tcp" && p.transport != "rdma")
    return fmt::format("transport='{}' is not accepted (use auto, tcp or rdma)", p.transport);
  if (p.epoch_ms < 1 || p.epoch_ms > 10000) return epoch_ms_problem(std::to_string(p.epoch_ms));
  if (p.failover != "auto" && p.failover != "manual")
    return fmt::format("failover='{}' is not accepted (use auto: the standby resumes the twin when the primary is "
                       "lost; or manual: it waits for `ftctl failover --force`)",
                       p.failover);
  if (p.arbiter.size() > 32 ||
      !std::all_of(p.arbiter.begin(), p.arbiter.end(), [](char c) { return (c >= 'a' && c <= 'z') || c == '-'; }))
    return fmt::format("arbiter='{}' is not an arbiter kind (none, fence-command, corosync, sanlock; empty = the "
                       "host's)",
                       p.arbiter);
  if (p.reprotect != "auto" && p.reprotect != "manual")
    return fmt::format("reprotect='{}' is not accepted (use auto: after a failover the new primary protects the VM "
                       "again as soon as a standby is available; or manual: only `ftctl enable` on the new host does)",
                       p.reprotect);
  return std::nullopt;
}

std::optional<Protection> parse_protection(const std::string& xml) {
  xml::DocPtr doc = xml::parse(xml, "protection metadata");
  xmlNode* root = xmlDocGetRootElement(doc.get());
  if (is_elem(root, "domain")) {
    auto found = protection_elements(root);
    if (found.empty()) return std::nullopt;
    if (found.size() > 1) fail("domain XML: {}", two_elements_problem());
    return read_protection_or_throw(found.front());
  }
  if (local_name(root) != "protection")
    fail("protection metadata: root element is <{}>, expected <domain> or <protection>", S(root->name));
  if (root->ns && root->ns->href && S(root->ns->href) != kProtectionNs)
    fail("protection metadata: <{}> is in namespace '{}', expected '{}'", S(root->name), S(root->ns->href),
         kProtectionNs);
  return read_protection_or_throw(root);
}

std::string protection_element(const Protection& p) { return "<protection " + protection_attrs(p) + "/>"; }

std::string protection_element_qualified(const Protection& p) {
  return fmt::format("<{0}:protection xmlns:{0}=\"{1}\" {2}/>", kProtectionPrefix, kProtectionNs, protection_attrs(p));
}

DomainDeclaration read_domain_declaration(const std::string& domain_xml) {
  xml::DocPtr doc = xml::parse(domain_xml, "domain XML");
  xmlNode* root = xmlDocGetRootElement(doc.get());
  DomainDeclaration d;
  d.root = S(root->name);
  if (!is_elem(root, "domain")) return d;
  d.is_domain = true;
  bool have_name = false, have_uuid = false;
  for (xmlNode* c = root->children; c; c = c->next) {
    if (is_elem(c, "name") && !have_name) {
      d.name = trimmed_text(c);
      have_name = true;
    } else if (is_elem(c, "uuid") && !have_uuid) {
      d.uuid = trimmed_text(c);
      have_uuid = true;
    }
  }
  auto found = protection_elements(root);
  if (found.empty()) return d;
  d.has_element = true;
  if (found.size() > 1) {
    d.invalid = two_elements_problem();
    return d;
  }
  Protection p;
  if (auto why = read_protection(found.front(), p))
    d.invalid = *why;
  else
    d.protection = p;
  return d;
}

bool looks_like_uuid(const std::string& s) {
  auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  if (s.size() == 32) {
    for (char c : s)
      if (!hex(c)) return false;
    return true;
  }
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? s[i] != '-' : !hex(s[i])) return false;
  }
  return true;
}

}  // namespace ftvm::vmm
