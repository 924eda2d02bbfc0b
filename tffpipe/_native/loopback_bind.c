/* LD_PRELOAD shim for TFF's worker_binary: choose the address it listens on.
 *
 * TFF 0.87's worker binds its gRPC server to the wildcard address ([::], which also
 * takes IPv4) without authentication, so any machine that can reach this one could
 * run computations in it. tffpipe starts that worker with this library preloaded:
 * every bind() to a wildcard address is rewritten to TFFPIPE_BIND_ADDRESS (default
 * 127.0.0.1). An IPv4 address on gRPC's IPv6 socket becomes the v4-mapped address
 * (::ffff:a.b.c.d), which accepts IPv4 connections to exactly that address.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int target_family = 0;
static struct in_addr target_v4;
static struct in6_addr target_v6;

static void choose_target(void) {
  const char *address = getenv("TFFPIPE_BIND_ADDRESS");
  if (address == NULL || *address == '\0') address = "127.0.0.1";
  if (inet_pton(AF_INET, address, &target_v4) == 1) {
    target_family = AF_INET;
  } else if (inet_pton(AF_INET6, address, &target_v6) == 1) {
    target_family = AF_INET6;
  } else {
    target_family = AF_INET;
    target_v4.s_addr = htonl(INADDR_LOOPBACK);
  }
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (target_family == 0) choose_target();
  if (addr != NULL && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in v4;
    memcpy(&v4, addr, sizeof(v4));
    if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
      v4.sin_addr.s_addr = target_family == AF_INET ? target_v4.s_addr : htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&v4, sizeof(v4));
    }
  } else if (addr != NULL && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 v6;
    memcpy(&v6, addr, sizeof(v6));
    if (memcmp(&v6.sin6_addr, &in6addr_any, sizeof(in6addr_any)) == 0) {
      if (target_family == AF_INET6) {
        v6.sin6_addr = target_v6;
      } else { /* ::ffff:a.b.c.d */
        memset(&v6.sin6_addr, 0, sizeof(v6.sin6_addr));
        v6.sin6_addr.s6_addr[10] = 0xff;
        v6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&v6.sin6_addr.s6_addr[12], &target_v4, 4);
      }
      return real_bind(fd, (const struct sockaddr *)&v6, sizeof(v6));
    }
  }
  return real_bind(fd, addr, len);
}
