/* LD_PRELOAD shim for TFF's local worker_binary.
 *
 * TFF 0.87's worker binds its gRPC server to 0.0.0.0 and [::] without
 * authentication, so any machine that can reach this one could run
 * computations in it. tffpipe starts that worker with this library preloaded:
 * every bind() to a wildcard address is rewritten to the matching loopback
 * address, so the worker is reachable from this machine only.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (addr != NULL && addr->sa_family == AF_INET &&
      len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in v4;
    memcpy(&v4, addr, sizeof(v4));
    if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
      v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&v4, sizeof(v4));
    }
  } else if (addr != NULL && addr->sa_family == AF_INET6 &&
             len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 v6;
    memcpy(&v6, addr, sizeof(v6));
    if (memcmp(&v6.sin6_addr, &in6addr_any, sizeof(in6addr_any)) == 0) {
      v6.sin6_addr = in6addr_loopback;
      return real_bind(fd, (const struct sockaddr *)&v6, sizeof(v6));
    }
  }
  return real_bind(fd, addr, len);
}
