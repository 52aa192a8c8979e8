// verbs_smoke: a small real libibverbs/librdmacm program for the RDMA lab (tests/rdma-lab).
//
// The client connects to the server with rdma_cm (RC QP), learns the server's buffer address and
// rkey from the accept's private data, does one RDMA WRITE (first half of the buffer) and one
// RDMA WRITE_WITH_IMM (second half); the server checks the immediate value and every byte and
// SENDs back "VERIFIED" or "MISMATCH". Exit 0 only when everything matched.
//
// Usage: verbs_smoke [loop|server|client] [ADDR] [PORT]
//   loop   (default) server (forked child) and client in one guest, both on ADDR (default $LAB_IP)
//   server listen on ADDR (default $LAB_IP)     client  connect to ADDR (default $LAB_PEER_IP)
//   PORT   rdma_cm port (default 18515)
// Environment: RXE_DEV (set by lab.sh): when set, the device rdma_cm picked must have this name.
//              VERBS_SMOKE_TIMEOUT_S: give up after this many seconds (default 60); the client
//              retries while the server is not up yet (two-host runs boot both guests at once).
// Prints "verbs device <name>" for the device it used.
#include <arpa/inet.h>
#include <endian.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

constexpr size_t kHalf = 4096;
constexpr size_t kBufSize = 2 * kHalf;
constexpr uint32_t kImm = 0xF7A11234;
constexpr char kVerified[8] = {'V', 'E', 'R', 'I', 'F', 'I', 'E', 'D'};
using Clock = std::chrono::steady_clock;

const char* g_role = "verbs_smoke";
Clock::time_point g_deadline;

struct RemoteBuf {  // accept private data, network byte order
  uint64_t addr;
  uint32_t rkey;
  uint32_t len;
};

#define FAIL(...)                                            \
  do {                                                       \
    std::fprintf(stderr, "%s: ", g_role);                    \
    std::fprintf(stderr, __VA_ARGS__);                       \
    std::fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);  \
    return false;                                            \
  } while (0)

int ms_left() {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(g_deadline - Clock::now()).count();
  return ms > 0 ? static_cast<int>(ms) : 0;
}

uint8_t pattern(size_t i, int which) { return static_cast<uint8_t>((i * 131 + 7 + which * 0x5b) & 0xff); }

// Waits for the next rdma_cm event (until the deadline); the caller acks it.
bool next_event(rdma_event_channel* ec, rdma_cm_event** ev) {
  pollfd p{ec->fd, POLLIN, 0};
  int r = poll(&p, 1, ms_left());
  if (r == 0) FAIL("timed out waiting for an rdma_cm event");
  if (r < 0) FAIL("poll: %s", std::strerror(errno));
  if (rdma_get_cm_event(ec, ev) != 0) FAIL("rdma_get_cm_event: %s", std::strerror(errno));
  return true;
}

bool expect_event(rdma_event_channel* ec, rdma_cm_event_type want, rdma_cm_event** out = nullptr) {
  rdma_cm_event* ev = nullptr;
  if (!next_event(ec, &ev)) return false;
  if (ev->event != want) {
    std::fprintf(stderr, "%s: expected %s, got %s (status %d)\n", g_role, rdma_event_str(want),
                 rdma_event_str(ev->event), ev->status);
    rdma_ack_cm_event(ev);
    return false;
  }
  if (out) *out = ev;
  else rdma_ack_cm_event(ev);
  return true;
}

bool poll_wc(ibv_cq* cq, ibv_wc* wc) {
  while (true) {
    int n = ibv_poll_cq(cq, 1, wc);
    if (n < 0) FAIL("ibv_poll_cq failed");
    if (n == 1) {
      if (wc->status != IBV_WC_SUCCESS)
        FAIL("work completion wr_id=%llu: %s", static_cast<unsigned long long>(wc->wr_id),
             ibv_wc_status_str(wc->status));
      return true;
    }
    if (ms_left() == 0) FAIL("timed out waiting for a work completion");
    usleep(50);
  }
}

bool check_device(rdma_cm_id* id) {
  if (!id->verbs) FAIL("rdma_cm id has no verbs context");
  const char* name = ibv_get_device_name(id->verbs->device);
  std::printf("%s: verbs device %s port %u\n", g_role, name, id->port_num);
  std::fflush(stdout);
  const char* want = std::getenv("RXE_DEV");
  if (want && *want && std::strcmp(want, name) != 0) FAIL("expected device %s (RXE_DEV), got %s", want, name);
  return true;
}

bool parse_addr(const char* host, const char* port, sockaddr_storage* ss) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* res = nullptr;
  if (int e = getaddrinfo(host, port, &hints, &res); e != 0) FAIL("bad address %s:%s: %s", host, port, gai_strerror(e));
  std::memcpy(ss, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  return true;
}

// Everything one side of the connection owns; destroyed in reverse order.
struct Conn {
  rdma_event_channel* ec = nullptr;
  rdma_cm_id* listen_id = nullptr;
  rdma_cm_id* id = nullptr;
  ibv_pd* pd = nullptr;
  ibv_cq* cq = nullptr;
  ibv_mr* mr = nullptr;
  alignas(64) uint8_t buf[kBufSize + 64] = {};  // kBufSize data + control message space

  Conn() = default;
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn() {
    if (id && id->qp) rdma_destroy_qp(id);
    if (mr) ibv_dereg_mr(mr);
    if (cq) ibv_destroy_cq(cq);
    if (pd) ibv_dealloc_pd(pd);
    if (id) rdma_destroy_id(id);
    if (listen_id) rdma_destroy_id(listen_id);
    if (ec) rdma_destroy_event_channel(ec);
  }

  bool setup_qp() {
    pd = ibv_alloc_pd(id->verbs);
    if (!pd) FAIL("ibv_alloc_pd: %s", std::strerror(errno));
    cq = ibv_create_cq(id->verbs, 16, nullptr, nullptr, 0);
    if (!cq) FAIL("ibv_create_cq: %s", std::strerror(errno));
    ibv_qp_init_attr qa{};
    qa.send_cq = cq;
    qa.recv_cq = cq;
    qa.qp_type = IBV_QPT_RC;
    qa.sq_sig_all = 1;
    qa.cap.max_send_wr = 4;
    qa.cap.max_recv_wr = 4;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    if (rdma_create_qp(id, pd, &qa) != 0) FAIL("rdma_create_qp: %s", std::strerror(errno));
    mr = ibv_reg_mr(pd, buf, sizeof buf, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    if (!mr) FAIL("ibv_reg_mr: %s", std::strerror(errno));
    return true;
  }

  bool post_recv(uint64_t wr_id, void* addr, uint32_t len) {
    ibv_sge sge{reinterpret_cast<uintptr_t>(addr), len, mr->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = len ? &sge : nullptr;
    wr.num_sge = len ? 1 : 0;
    ibv_recv_wr* bad = nullptr;
    if (ibv_post_recv(id->qp, &wr, &bad) != 0) FAIL("ibv_post_recv: %s", std::strerror(errno));
    return true;
  }
};

bool run_server(const char* host, const char* port, int ready_fd) {
  sockaddr_storage ss{};
  if (!parse_addr(host, port, &ss)) return false;
  Conn c;
  c.ec = rdma_create_event_channel();
  if (!c.ec) FAIL("rdma_create_event_channel: %s (is rdma_ucm loaded?)", std::strerror(errno));
  if (rdma_create_id(c.ec, &c.listen_id, nullptr, RDMA_PS_TCP) != 0) FAIL("rdma_create_id: %s", std::strerror(errno));
  if (rdma_bind_addr(c.listen_id, reinterpret_cast<sockaddr*>(&ss)) != 0)
    FAIL("rdma_bind_addr %s:%s: %s", host, port, std::strerror(errno));
  if (rdma_listen(c.listen_id, 1) != 0) FAIL("rdma_listen: %s", std::strerror(errno));
  std::printf("%s: listening on %s:%s\n", g_role, host, port);
  std::fflush(stdout);
  if (ready_fd >= 0) {
    (void)!write(ready_fd, "R", 1);
    close(ready_fd);
  }

  rdma_cm_event* ev = nullptr;
  if (!expect_event(c.ec, RDMA_CM_EVENT_CONNECT_REQUEST, &ev)) return false;
  c.id = ev->id;
  rdma_ack_cm_event(ev);
  if (!check_device(c.id) || !c.setup_qp()) return false;
  std::memset(c.buf, 0, sizeof c.buf);
  if (!c.post_recv(1, nullptr, 0)) return false;  // consumed by the WRITE_WITH_IMM

  RemoteBuf rb{htobe64(reinterpret_cast<uintptr_t>(c.buf)), htonl(c.mr->rkey), htonl(kBufSize)};
  rdma_conn_param cp{};
  cp.private_data = &rb;
  cp.private_data_len = sizeof rb;
  cp.responder_resources = 1;
  cp.initiator_depth = 1;
  if (rdma_accept(c.id, &cp) != 0) FAIL("rdma_accept: %s", std::strerror(errno));
  if (!expect_event(c.ec, RDMA_CM_EVENT_ESTABLISHED)) return false;

  ibv_wc wc{};
  if (!poll_wc(c.cq, &wc)) return false;
  if (wc.opcode != IBV_WC_RECV_RDMA_WITH_IMM) FAIL("expected RECV_RDMA_WITH_IMM, got opcode %d", wc.opcode);
  if (!(wc.wc_flags & IBV_WC_WITH_IMM) || ntohl(wc.imm_data) != kImm)
    FAIL("immediate data 0x%08x, expected 0x%08x", ntohl(wc.imm_data), kImm);
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < kBufSize; ++i) {
    if (c.buf[i] != pattern(i, i < kHalf ? 0 : 1) && bad++ == 0) first_bad = i;
  }
  bool ok = bad == 0;
  if (ok) std::printf("%s: RDMA WRITE + WRITE_WITH_IMM (imm 0x%08x): %zu bytes verified\n", g_role, kImm, kBufSize);
  else std::fprintf(stderr, "%s: %zu of %zu bytes differ (first at %zu)\n", g_role, bad, kBufSize, first_bad);

  uint8_t* msg = c.buf + kBufSize;
  std::memcpy(msg, ok ? kVerified : "MISMATCH", 8);
  ibv_sge sge{reinterpret_cast<uintptr_t>(msg), 8, c.mr->lkey};
  ibv_send_wr wr{};
  wr.wr_id = 2;
  wr.opcode = IBV_WR_SEND;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_send_wr* badwr = nullptr;
  if (ibv_post_send(c.id->qp, &wr, &badwr) != 0) FAIL("ibv_post_send: %s", std::strerror(errno));
  if (!poll_wc(c.cq, &wc)) return false;
  if (!expect_event(c.ec, RDMA_CM_EVENT_DISCONNECTED)) return false;
  return ok;
}

enum class Try { kOk, kRetry, kFail };

Try client_once(const char* host, const char* port) {
  sockaddr_storage ss{};
  if (!parse_addr(host, port, &ss)) return Try::kFail;
  Conn c;
  c.ec = rdma_create_event_channel();
  if (!c.ec) {
    std::fprintf(stderr, "%s: rdma_create_event_channel: %s\n", g_role, std::strerror(errno));
    return Try::kFail;
  }
  if (rdma_create_id(c.ec, &c.id, nullptr, RDMA_PS_TCP) != 0) return Try::kFail;
  auto retryable = [&](rdma_cm_event_type want, rdma_cm_event** out) -> Try {
    rdma_cm_event* ev = nullptr;
    if (!next_event(c.ec, &ev)) return Try::kFail;
    if (ev->event == want) {
      if (out) *out = ev;
      else rdma_ack_cm_event(ev);
      return Try::kOk;
    }
    auto e = ev->event;
    int st = ev->status;
    rdma_ack_cm_event(ev);
    if (e == RDMA_CM_EVENT_REJECTED || e == RDMA_CM_EVENT_UNREACHABLE || e == RDMA_CM_EVENT_ADDR_ERROR ||
        e == RDMA_CM_EVENT_ROUTE_ERROR || e == RDMA_CM_EVENT_CONNECT_ERROR) {
      std::printf("%s: %s (status %d), server not up yet? retrying\n", g_role, rdma_event_str(e), st);
      return Try::kRetry;
    }
    std::fprintf(stderr, "%s: expected %s, got %s (status %d)\n", g_role, rdma_event_str(want), rdma_event_str(e), st);
    return Try::kFail;
  };
  if (rdma_resolve_addr(c.id, nullptr, reinterpret_cast<sockaddr*>(&ss), 2000) != 0) return Try::kRetry;
  if (Try t = retryable(RDMA_CM_EVENT_ADDR_RESOLVED, nullptr); t != Try::kOk) return t;
  if (rdma_resolve_route(c.id, 2000) != 0) return Try::kRetry;
  if (Try t = retryable(RDMA_CM_EVENT_ROUTE_RESOLVED, nullptr); t != Try::kOk) return t;
  if (!check_device(c.id) || !c.setup_qp()) return Try::kFail;
  uint8_t* msg = c.buf + kBufSize;
  if (!c.post_recv(3, msg, 8)) return Try::kFail;
  for (size_t i = 0; i < kBufSize; ++i) c.buf[i] = pattern(i, i < kHalf ? 0 : 1);

  rdma_conn_param cp{};
  cp.responder_resources = 1;
  cp.initiator_depth = 1;
  cp.retry_count = 7;
  cp.rnr_retry_count = 7;
  auto t0 = Clock::now();
  if (rdma_connect(c.id, &cp) != 0) {
    std::fprintf(stderr, "%s: rdma_connect: %s\n", g_role, std::strerror(errno));
    return Try::kFail;
  }
  rdma_cm_event* ev = nullptr;
  if (Try t = retryable(RDMA_CM_EVENT_ESTABLISHED, &ev); t != Try::kOk) return t;
  RemoteBuf rb{};
  if (!ev->param.conn.private_data || ev->param.conn.private_data_len < sizeof rb) {
    rdma_ack_cm_event(ev);
    std::fprintf(stderr, "%s: no buffer description in the accept's private data\n", g_role);
    return Try::kFail;
  }
  std::memcpy(&rb, ev->param.conn.private_data, sizeof rb);
  rdma_ack_cm_event(ev);
  uint64_t raddr = be64toh(rb.addr);
  uint32_t rkey = ntohl(rb.rkey), rlen = ntohl(rb.len);
  auto t1 = Clock::now();
  std::printf("%s: connected to %s:%s in %.1f ms (remote buffer 0x%llx len %u rkey 0x%x)\n", g_role, host, port,
              std::chrono::duration<double, std::milli>(t1 - t0).count(), static_cast<unsigned long long>(raddr),
              rlen, rkey);
  if (rlen < kBufSize) {
    std::fprintf(stderr, "%s: remote buffer too small (%u)\n", g_role, rlen);
    return Try::kFail;
  }

  ibv_sge sge[2] = {{reinterpret_cast<uintptr_t>(c.buf), kHalf, c.mr->lkey},
                    {reinterpret_cast<uintptr_t>(c.buf + kHalf), kHalf, c.mr->lkey}};
  ibv_send_wr wr[2]{};
  wr[0].wr_id = 10;
  wr[0].opcode = IBV_WR_RDMA_WRITE;
  wr[0].sg_list = &sge[0];
  wr[0].num_sge = 1;
  wr[0].wr.rdma.remote_addr = raddr;
  wr[0].wr.rdma.rkey = rkey;
  wr[0].next = &wr[1];
  wr[1].wr_id = 11;
  wr[1].opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  wr[1].imm_data = htonl(kImm);
  wr[1].sg_list = &sge[1];
  wr[1].num_sge = 1;
  wr[1].wr.rdma.remote_addr = raddr + kHalf;
  wr[1].wr.rdma.rkey = rkey;
  ibv_send_wr* bad = nullptr;
  if (ibv_post_send(c.id->qp, wr, &bad) != 0) {
    std::fprintf(stderr, "%s: ibv_post_send: %s\n", g_role, std::strerror(errno));
    return Try::kFail;
  }
  int writes = 0;
  bool got_reply = false;
  while (writes < 2 || !got_reply) {
    ibv_wc wc{};
    if (!poll_wc(c.cq, &wc)) return Try::kFail;
    if (wc.wr_id == 3) got_reply = true;
    else ++writes;
  }
  auto t2 = Clock::now();
  bool ok = std::memcmp(msg, kVerified, 8) == 0;
  std::printf("%s: RDMA WRITE %zu B + WRITE_WITH_IMM %zu B -> server says %.8s (%.2f ms)\n", g_role, kHalf, kHalf,
              reinterpret_cast<const char*>(msg), std::chrono::duration<double, std::milli>(t2 - t1).count());
  rdma_disconnect(c.id);
  expect_event(c.ec, RDMA_CM_EVENT_DISCONNECTED);
  return ok ? Try::kOk : Try::kFail;
}

bool run_client(const char* host, const char* port) {
  while (true) {
    Try t = client_once(host, port);
    if (t == Try::kOk) return true;
    if (t == Try::kFail) return false;
    if (ms_left() < 500) {
      std::fprintf(stderr, "%s: gave up connecting to %s:%s\n", g_role, host, port);
      return false;
    }
    usleep(300 * 1000);
  }
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "loop";
  if (mode == "-h" || mode == "--help" || (mode != "loop" && mode != "server" && mode != "client") || argc > 4) {
    std::fprintf(stderr, "usage: verbs_smoke [loop|server|client] [ADDR] [PORT]\n");
    return 2;
  }
  const char* addr = argc > 2 ? argv[2] : env_or(mode == "client" ? "LAB_PEER_IP" : "LAB_IP", nullptr);
  const char* port = argc > 3 ? argv[3] : "18515";
  if (!addr) {
    std::fprintf(stderr, "verbs_smoke: no address given and %s not set\n", mode == "client" ? "LAB_PEER_IP" : "LAB_IP");
    return 2;
  }
  g_deadline = Clock::now() + std::chrono::seconds(std::atoi(env_or("VERBS_SMOKE_TIMEOUT_S", "60")));
  setvbuf(stdout, nullptr, _IOLBF, 0);

  if (mode == "server") {
    g_role = "server";
    return run_server(addr, port, -1) ? 0 : 1;
  }
  if (mode == "client") {
    g_role = "client";
    return run_client(addr, port) ? 0 : 1;
  }
  // loop: fork before any verbs call (libibverbs state must not cross fork)
  int ready[2];
  if (pipe(ready) != 0) return 1;
  pid_t pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) {
    close(ready[0]);
    g_role = "server";
    _exit(run_server(addr, port, ready[1]) ? 0 : 1);
  }
  close(ready[1]);
  char r;
  bool listening = read(ready[0], &r, 1) == 1;
  close(ready[0]);
  g_role = "client";
  bool ok = listening && run_client(addr, port);
  if (!ok) kill(pid, SIGTERM);
  int st = 0;
  waitpid(pid, &st, 0);
  bool server_ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
  std::printf("verbs_smoke: client %s, server %s\n", ok ? "ok" : "FAILED", server_ok ? "ok" : "FAILED");
  return ok && server_ok ? 0 : 1;
}
