/* A minimal FUSE filesystem in C serving a synthetic tree (D dirs x F files, from the
 * FLOOR_DIRS and FLOOR_FILES environment variables), answering opendir with ENOSYS and
 * READDIRPLUS as cafs does: the protocol's floor for a tree walk (bench/floor/run.py). */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/stat.h>

static long D = 2100, F = 6;
static int is_dir(fuse_ino_t ino) { return ino == 1 || (ino >= 2 && ino < (fuse_ino_t)(2 + D)); }
static void fill(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (is_dir(ino)) { st->st_mode = S_IFDIR | 0755; st->st_nlink = 2; st->st_size = 4096; }
    else { st->st_mode = S_IFREG | 0644; st->st_nlink = 1; st->st_size = 100; }
}
static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi; struct stat st; fill(ino, &st); fuse_reply_attr(req, &st, 86400);
}
static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e; memset(&e, 0, sizeof e);
    e.attr_timeout = e.entry_timeout = 86400;
    fuse_ino_t ino = 0;
    if (parent == 1 && name[0] == 'd') { long i = atol(name + 1); if (i >= 0 && i < D) ino = 2 + i; }
    else if (is_dir(parent) && parent != 1 && name[0] == 'f') {
        long j = atol(name + 1); if (j >= 0 && j < F) ino = 2 + D + (parent - 2) * F + j; }
    if (!ino) { fuse_reply_err(req, ENOENT); return; }
    e.ino = ino; fill(ino, &e.attr); fuse_reply_entry(req, &e);
}
static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi; fuse_reply_err(req, ENOSYS);
}
static void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi) {
    (void)fi; char *buf = malloc(size); size_t pos = 0; long n = ino == 1 ? D : F; char name[32];
    for (off_t k = off; k < n; k++) {
        struct fuse_entry_param e; memset(&e, 0, sizeof e);
        e.attr_timeout = e.entry_timeout = 86400;
        if (ino == 1) { snprintf(name, sizeof name, "d%05lld", (long long)k); e.ino = 2 + k; }
        else { snprintf(name, sizeof name, "f%lld", (long long)k); e.ino = 2 + D + (ino - 2) * F + k; }
        fill(e.ino, &e.attr);
        size_t need = fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, k + 1);
        if (need > size - pos) break;
        pos += need;
    }
    fuse_reply_buf(req, buf, pos); free(buf);
}
static const struct fuse_lowlevel_ops ops = {
    .lookup = ll_lookup, .getattr = ll_getattr, .opendir = ll_opendir, .readdirplus = ll_readdirplus };
int main(int argc, char **argv) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv); struct fuse_cmdline_opts o;
    if (getenv("FLOOR_DIRS")) D = atol(getenv("FLOOR_DIRS"));
    if (getenv("FLOOR_FILES")) F = atol(getenv("FLOOR_FILES"));
    if (fuse_parse_cmdline(&args, &o) != 0 || !o.mountpoint) return 1;
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (!se || fuse_session_mount(se, o.mountpoint) != 0) return 1;
    fuse_daemonize(o.foreground);
    int r = fuse_session_loop(se);
    fuse_session_unmount(se); fuse_session_destroy(se); return r;
}
