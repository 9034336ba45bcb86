/* LD_PRELOAD shim for tests/mpi_jobs.sh: stops one rank of an MPI job (SIGSTOP to itself, as
 * `kill -STOP` or a debugger would) at a chosen point, deterministically.
 *
 *   SAFESHARD_STOP_RANK=R  the rank (OMPI_COMM_WORLD_RANK) that stops
 *   SAFESHARD_STOP_AT=     init       inside MPI_Init, at the launcher's fence (PMIx_Fence[_nb])
 *                          handshake  when MPI_Init returns: before the first arrival handshake
 *                          broadcast  inside a collective: at the first broadcast it is the root
 *                                     of, after the arrival handshake, before any data moves
 *                          alltoallv  inside a collective: at the first all-to-all-v of at least
 *                                     4 KiB, after its handshake, before data moves
 *                          exchange   inside a read-once exchange: at the first message of at least
 *                                     4 KiB it sends (tag 0x5b01, mpi.rs), after the exchange's
 *                                     handshake and its receives are posted, before data moves
 *                          finalize   at MPI_Finalize, after the job's last collective
 *
 * Build: mpicc -shared -fPIC -o stop_rank.so stop_rank.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <mpi.h>

static void stop_once(const char *where) {
    static int done;
    const char *r = getenv("SAFESHARD_STOP_RANK"), *me = getenv("OMPI_COMM_WORLD_RANK");
    const char *at = getenv("SAFESHARD_STOP_AT");
    if (!done && r && me && at && strcmp(r, me) == 0 && strcmp(at, where) == 0) {
        done = 1;
        raise(SIGSTOP);
    }
}

typedef int (*fence_nb_t)(const void *, size_t, const void *, size_t, void *, void *);
int PMIx_Fence_nb(const void *procs, size_t nprocs, const void *info, size_t ninfo, void *cb,
                  void *cbdata) {
    stop_once("init");
    fence_nb_t real = (fence_nb_t)dlsym(RTLD_NEXT, "PMIx_Fence_nb");
    return real(procs, nprocs, info, ninfo, cb, cbdata);
}

typedef int (*fence_t)(const void *, size_t, const void *, size_t);
int PMIx_Fence(const void *procs, size_t nprocs, const void *info, size_t ninfo) {
    stop_once("init");
    fence_t real = (fence_t)dlsym(RTLD_NEXT, "PMIx_Fence");
    return real(procs, nprocs, info, ninfo);
}

int MPI_Init(int *argc, char ***argv) {
    int rc = PMPI_Init(argc, argv);
    stop_once("handshake");
    return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided) {
    int rc = PMPI_Init_thread(argc, argv, required, provided);
    stop_once("handshake");
    return rc;
}

int MPI_Ibcast(void *buf, int count, MPI_Datatype type, int root, MPI_Comm comm,
               MPI_Request *req) {
    int me = -1;
    MPI_Comm_rank(comm, &me);
    if (me == root) stop_once("broadcast");
    return PMPI_Ibcast(buf, count, type, root, comm, req);
}

int MPI_Ialltoallv(const void *sbuf, const int scounts[], const int sdispls[], MPI_Datatype st,
                   void *rbuf, const int rcounts[], const int rdispls[], MPI_Datatype rt,
                   MPI_Comm comm, MPI_Request *req) {
    int n = 0;
    long total = 0;
    MPI_Comm_size(comm, &n);
    for (int i = 0; i < n; i++) total += scounts[i];
    if (total >= 4096) stop_once("alltoallv");
    return PMPI_Ialltoallv(sbuf, scounts, sdispls, st, rbuf, rcounts, rdispls, rt, comm, req);
}

int MPI_Isend(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm,
              MPI_Request *req) {
    int size = 0;
    MPI_Type_size(type, &size);
    if (tag == 0x5b01 && (long)count * size >= 4096) stop_once("exchange");
    return PMPI_Isend(buf, count, type, dest, tag, comm, req);
}

int MPI_Finalize(void) {
    stop_once("finalize");
    return PMPI_Finalize();
}
