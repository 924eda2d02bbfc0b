/* LD_PRELOAD shim for TFF's worker_binary: where it listens, and that it dies with its parent.
 *
 * TFF 0.87's worker binds its gRPC server to the wildcard address ([::], which also
 * takes IPv4) without authentication, so anyone who can reach the port can run
 * TensorFlow graphs as the worker's user. tffpipe starts that worker with this library
 * preloaded, and every bind() to a wildcard address is rewritten to TFFPIPE_BIND_ADDRESS:
 *
 *   unix:/path   a Unix domain socket at /path. tffpipe puts it in a 0700 directory of
 *                the run's user, so no other local user (and nothing on the network) can
 *                connect: the kernel checks the directory's permissions on connect().
 *                The socket gRPC created (AF_INET6) is replaced in place by an AF_UNIX
 *                socket with the same file-status flags (dup3 onto the same descriptor).
 *   an IP        that address (default 127.0.0.1). An IPv4 address on gRPC's IPv6 socket
 *                becomes the v4-mapped address (::ffff:a.b.c.d), which accepts IPv4
 *                connections to exactly that address.
 *
 * At load, before the worker's main() and before any of its threads exist, the
 * constructor below sets what Python used to set between fork and exec (where only
 * async-signal-safe code may run while gRPC's threads are live in the parent):
 *
 *   TFFPIPE_PARENT_PID  PR_SET_PDEATHSIG(SIGKILL); exit at once if the parent is gone.
 *   TFFPIPE_CPUS        the CPUs to run on, e.g. "0" or "0,1" (sched_setaffinity).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

enum { TARGET_UNSET, TARGET_V4, TARGET_V6, TARGET_UNIX };

static int target_kind = TARGET_UNSET;
static struct in_addr target_v4;
static struct in6_addr target_v6;
static struct sockaddr_un target_unix;

__attribute__((constructor)) static void tffpipe_worker_init(void) {
  const char *parent = getenv("TFFPIPE_PARENT_PID");
  if (parent != NULL && *parent != '\0') {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != (pid_t)atol(parent)) _exit(1); /* the parent died before prctl took effect */
  }
  const char *cpus = getenv("TFFPIPE_CPUS");
  if (cpus != NULL && *cpus != '\0') {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (const char *p = cpus; *p != '\0';) {
      char *end;
      long cpu = strtol(p, &end, 10);
      if (end == p) break;
      if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET((int)cpu, &set);
      p = *end == ',' ? end + 1 : end;
    }
    if (CPU_COUNT(&set) > 0) sched_setaffinity(0, sizeof(set), &set);
  }
}

static void choose_target(void) {
  const char *address = getenv("TFFPIPE_BIND_ADDRESS");
  if (address == NULL || *address == '\0') address = "127.0.0.1";
  if (strncmp(address, "unix:", 5) == 0 && strlen(address + 5) > 0 &&
      strlen(address + 5) < sizeof(target_unix.sun_path)) {
    memset(&target_unix, 0, sizeof(target_unix));
    target_unix.sun_family = AF_UNIX;
    strcpy(target_unix.sun_path, address + 5);
    target_kind = TARGET_UNIX;
  } else if (inet_pton(AF_INET, address, &target_v4) == 1) {
    target_kind = TARGET_V4;
  } else if (inet_pton(AF_INET6, address, &target_v6) == 1) {
    target_kind = TARGET_V6;
  } else { /* anything unreadable: the safest choice */
    target_kind = TARGET_V4;
    target_v4.s_addr = htonl(INADDR_LOOPBACK);
  }
}

static int is_wildcard(const struct sockaddr *addr, socklen_t len) {
  if (addr == NULL) return 0;
  if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    return ((const struct sockaddr_in *)addr)->sin_addr.s_addr == htonl(INADDR_ANY);
  }
  if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    return memcmp(&((const struct sockaddr_in6 *)addr)->sin6_addr, &in6addr_any, sizeof(in6addr_any)) == 0;
  }
  return 0;
}

/* Replaces the socket at `fd` by a Unix stream socket with the same flags, bound to the target. */
static int bind_unix(int fd, bind_fn real_bind) {
  int status_flags = fcntl(fd, F_GETFL);
  int fd_flags = fcntl(fd, F_GETFD);
  if (status_flags < 0 || fd_flags < 0) return -1;
  int replacement = socket(AF_UNIX, SOCK_STREAM, 0);
  if (replacement < 0) return -1;
  if (fcntl(replacement, F_SETFL, status_flags) < 0 ||
      dup3(replacement, fd, (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
    close(replacement);
    return -1;
  }
  close(replacement);
  return real_bind(fd, (const struct sockaddr *)&target_unix, sizeof(target_unix));
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (target_kind == TARGET_UNSET) choose_target();
  if (!is_wildcard(addr, len)) return real_bind(fd, addr, len);
  if (target_kind == TARGET_UNIX) return bind_unix(fd, real_bind);
  if (addr->sa_family == AF_INET) {
    struct sockaddr_in v4;
    memcpy(&v4, addr, sizeof(v4));
    v4.sin_addr.s_addr = target_kind == TARGET_V4 ? target_v4.s_addr : htonl(INADDR_LOOPBACK);
    return real_bind(fd, (const struct sockaddr *)&v4, sizeof(v4));
  }
  struct sockaddr_in6 v6;
  memcpy(&v6, addr, sizeof(v6));
  if (target_kind == TARGET_V6) {
    v6.sin6_addr = target_v6;
  } else { /* ::ffff:a.b.c.d */
    memset(&v6.sin6_addr, 0, sizeof(v6.sin6_addr));
    v6.sin6_addr.s6_addr[10] = 0xff;
    v6.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&v6.sin6_addr.s6_addr[12], &target_v4, 4);
  }
  return real_bind(fd, (const struct sockaddr *)&v6, sizeof(v6));
}

/* gRPC sets TCP and IPv6 options on its listening and accepted sockets; on the Unix
 * socket that replaced one they do not apply, and their failure must not close it. */
int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
  static setsockopt_fn real_setsockopt = NULL;
  if (real_setsockopt == NULL) real_setsockopt = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
  int result = real_setsockopt(fd, level, name, value, len);
  if (result != 0 && target_kind == TARGET_UNIX && (level == IPPROTO_TCP || level == IPPROTO_IPV6 || level == IPPROTO_IP)) {
    struct sockaddr_storage local;
    socklen_t local_len = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &local_len) == 0 && local.ss_family == AF_UNIX) return 0;
  }
  return result;
}
