/* Weights streamed from a file into a ring buffer, read ahead by a background thread or when reached.
 *
 * A model whose weights exceed the memory it may use keeps some decoder layers where they are
 * stored and reads them each time they are used. Each streamed layer is cut into units (the
 * tensors one stage of the decode step reads: attention inputs, attention output, gate, up,
 * down); a pass over the model uses every unit once, in a fixed order, so the reader can load
 * the next units while the step computes with the current ones. Units land in one ring buffer
 * (contiguous, aligned positions, wrapping to the start when the end is too short) and
 * are released in the order they were acquired, so the free space is one arc.
 *
 * Consumers take the next unit in the pass order (Python through ctypes with
 * `memfit_stream_acquire`; the C decode step with claim, read and finish, so that all its threads
 * read a unit no reader has claimed) and give back the oldest with `memfit_stream_release`; taking
 * a unit the reader is reading waits for it. With ``ahead == 0`` there is no thread and consumers
 * read every unit. Taking a unit also writes its address into registered pointer fields (the
 * decode step's weight table), so the step reads streamed weights as it reads resident ones.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int64_t file_offset, nbytes, unit_offset;
} Piece;

typedef struct {
    int64_t unit, offset; /* the field gets ring + position of ``unit`` + offset */
    void **field;
} Patch;

typedef struct Stream {
    int fd;
    char *ring;
    int64_t capacity, units, ahead, slots; /* slots: most units in the ring at once */
    int64_t *size, *first_piece, *first_patch; /* [units], [units + 1], [units + 1] */
    Piece *pieces;
    Patch *patches;
    int64_t *position; /* [slots]: ring position of sequence number s at s % slots */
    int64_t *ready;    /* [slots]: s + 1 once unit s is read */
    int64_t claimed, acquired, released; /* sequence numbers: units claimed for reading, handed out, given back */
    int64_t bytes_read;
    double wait_seconds; /* consumers' time blocked in acquire */
    int error, stop, threaded, drop; /* drop: give each read's pages back to the kernel (page cache) */
    int direct_fd; /* the file opened with O_DIRECT, or -1: see read_piece */
    int64_t align;  /* ring positions are multiples of this (a power of two) */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t changed;
} Stream;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Where unit ``seq`` (the next to claim) can go now, or -1 if the ring has no room yet (call locked). */
static int64_t place(const Stream *s, int64_t seq) {
    const int64_t need = s->size[seq % s->units];
    if (seq - s->released >= s->slots) return -1;
    if (s->claimed == s->released) return 0; /* empty: start over at the front */
    const int64_t last = (s->claimed - 1) % s->slots;
    int64_t at = s->position[last] + s->size[(s->claimed - 1) % s->units];
    at = (at + s->align - 1) & ~(s->align - 1);
    if (at + need > s->capacity) at = 0;
    for (int64_t q = s->released; q < s->claimed; q++) { /* the units still held or not yet used */
        const int64_t p = s->position[q % s->slots], n = s->size[q % s->units];
        if (at < p + n && p < at + need) return -1;
    }
    return at;
}

#define PAGE 4096

/* Reads bytes ``[first, last)`` of the file from ``file_offset`` to ``at`` (the same offsets);
 * the file may end after ``needed``. 0, or an errno. */
static int read_range(int fd, char *at, int64_t first, int64_t last, int64_t file_offset, int64_t needed) {
    for (int64_t done = first; done < last;) {
        const ssize_t got = pread(fd, at + done, last - done, file_offset + done);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return errno;
        if (got == 0) return done >= needed ? 0 : EIO;
        done += got;
    }
    return 0;
}

/* Reads share ``part`` of ``parts`` of piece ``p`` to ``dst`` (the unit's start). A piece whose
 * place in the ring is at the same offset within a page as its bytes in the file (the layout
 * `layer_units` makes for reads around the page cache) is read with O_DIRECT when the stream has
 * such a descriptor: whole pages from the one before its first byte, straight from the disk into
 * the ring by DMA, no copy by a core. Other pieces are read through the page cache (and, with
 * ``drop``, their pages dropped after). Shares are whole pages, so several threads can read one piece. */
static int read_piece(Stream *s, const Piece *p, char *dst, int part, int parts) {
    char *const to = dst + p->unit_offset;
    const int64_t head = p->file_offset % PAGE;
    if (s->direct_fd >= 0 && ((uintptr_t)to - head) % PAGE == 0) {
        const int64_t span = (head + p->nbytes + PAGE - 1) & ~(int64_t)(PAGE - 1);
        const int64_t share = ((span + parts - 1) / parts + PAGE - 1) & ~(int64_t)(PAGE - 1);
        const int64_t first = share * part, last = first + share < span ? first + share : span;
        const int64_t needed = head + p->nbytes < last ? head + p->nbytes : last; /* the file may end in the last page */
        return read_range(s->direct_fd, to - head, first, last, p->file_offset - head, needed);
    }
    const int64_t share = ((p->nbytes + parts - 1) / parts + PAGE - 1) & ~(int64_t)(PAGE - 1);
    const int64_t first = share * part, last = first + share < p->nbytes ? first + share : p->nbytes;
    const int err = read_range(s->fd, to, first, last, p->file_offset, last);
    if (!err && s->drop && last > first) { /* whole pages: the kernel keeps partly covered ones */
        const int64_t from = (p->file_offset + first) & ~(int64_t)(PAGE - 1);
        const int64_t end = (p->file_offset + last + PAGE - 1) & ~(int64_t)(PAGE - 1);
        posix_fadvise(s->fd, from, end - from, POSIX_FADV_DONTNEED);
    }
    return err;
}

/* Reads share ``part`` of ``parts`` of ``unit`` into ``dst`` (see read_piece). 0, or an errno. */
static int read_unit(Stream *s, int64_t unit, char *dst, int part, int parts) {
    for (int64_t i = s->first_piece[unit]; i < s->first_piece[unit + 1]; i++) {
        const int err = read_piece(s, &s->pieces[i], dst, part, parts);
        if (err) return err;
    }
    return 0;
}

/* Claims unit ``seq`` for reading at its place in the ring (call locked, seq == claimed). */
static int64_t claim(Stream *s, int64_t seq) {
    const int64_t at = place(s, seq);
    if (at >= 0) {
        s->position[seq % s->slots] = at;
        s->ready[seq % s->slots] = 0;
        s->claimed++;
    }
    return at;
}

static void *reader(void *arg) {
    Stream *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop && !s->error) {
        const int64_t seq = s->claimed;
        const int64_t at = seq - s->acquired < s->ahead ? claim(s, seq) : -1;
        if (at < 0) {
            pthread_cond_wait(&s->changed, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        const int err = read_unit(s, seq % s->units, s->ring + at, 0, 1);
        pthread_mutex_lock(&s->mu);
        if (err) s->error = err;
        else s->ready[seq % s->slots] = seq + 1, s->bytes_read += s->size[seq % s->units];
        pthread_cond_broadcast(&s->changed);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* A stream over ``units`` units (in pass order) of the open file ``fd``, into ``ring``
 * [capacity bytes, aligned to ``align``, the positions' alignment]; ``size`` [units]; ``first_piece`` [units + 1] indexes
 * ``pieces`` (file offset, bytes, offset in the unit: three int64 each); ``ahead``: units read
 * ahead of the consumer (0: none, no thread). With ``drop``, the pages each read brought into the
 * page cache are dropped after it (``posix_fadvise(POSIX_FADV_DONTNEED)``): every pass reads the
 * disk, as it would for a model larger than the machine's memory, and the streamed file does not
 * push other files out of the cache; ``direct_fd`` (the same file opened with O_DIRECT, or -1)
 * then reads the pieces laid out for it (read_piece) around the page cache. NULL if the thread
 * cannot start. */
Stream *memfit_stream_open(int fd, char *ring, int64_t capacity, int64_t units, const int64_t *size,
                           const int64_t *first_piece, const int64_t *pieces, int64_t ahead, int drop,
                           int direct_fd, int64_t align) {
    Stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->fd = fd, s->ring = ring, s->capacity = capacity, s->units = units, s->ahead = ahead, s->drop = drop;
    s->direct_fd = direct_fd, s->align = align;
    /* the kernel's own read-ahead would fill the cache with pages the next reads drop: the reads are
     * whole tensors, large enough without it */
    if (drop) posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    /* and what loading the resident tensors brought in (their own reads, the kernel's read-ahead
     * around them) is in memory already: the streamed layers start from the disk */
    if (drop) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    s->slots = 64;
    s->size = malloc(units * sizeof *s->size);
    s->first_piece = malloc((units + 1) * sizeof *s->first_piece);
    s->first_patch = calloc(units + 1, sizeof *s->first_patch);
    s->pieces = malloc((first_piece[units] + 1) * sizeof *s->pieces);
    s->position = calloc(s->slots, sizeof *s->position);
    s->ready = calloc(s->slots, sizeof *s->ready);
    if (!s->size || !s->first_piece || !s->first_patch || !s->pieces || !s->position || !s->ready) goto fail;
    memcpy(s->size, size, units * sizeof *size);
    memcpy(s->first_piece, first_piece, (units + 1) * sizeof *first_piece);
    memcpy(s->pieces, pieces, first_piece[units] * sizeof *s->pieces);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->changed, NULL);
    if (ahead > 0) {
        if (pthread_create(&s->thread, NULL, reader, s)) goto fail;
        s->threaded = 1;
    }
    return s;
fail:
    free(s->size), free(s->first_piece), free(s->first_patch), free(s->pieces), free(s->position), free(s->ready);
    free(s);
    return NULL;
}

/* Pointer fields acquire writes: ``unit`` [n], ``offset`` [n] and ``field`` [n] (addresses),
 * sorted by unit. Replaces earlier ones. Returns 0, or ENOMEM. */
int memfit_stream_patches(Stream *s, int64_t n, const int64_t *unit, const int64_t *offset, void **const *field) {
    Patch *patches = malloc((n + 1) * sizeof *patches);
    if (!patches) return ENOMEM;
    pthread_mutex_lock(&s->mu);
    memset(s->first_patch, 0, (s->units + 1) * sizeof *s->first_patch);
    for (int64_t i = 0; i < n; i++) {
        patches[i] = (Patch){unit[i], offset[i], field[i]};
        s->first_patch[unit[i] + 1]++;
    }
    for (int64_t u = 0; u < s->units; u++) s->first_patch[u + 1] += s->first_patch[u];
    free(s->patches);
    s->patches = patches;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* Taking the next unit of the pass, in three calls so that several threads can read it together:
 * `memfit_stream_claim` returns 1 if the caller must read it (no reader has claimed it: it is
 * claimed now, at *at, as unit *unit), or 0 once the reader has read it (waiting if needed; -1
 * after a read error); the readers then call `memfit_stream_read` with their share, and one calls
 * `memfit_stream_finish`, which fills the unit's patched fields and hands it out. */
int memfit_stream_claim(Stream *s, int64_t *at, int64_t *unit) {
    pthread_mutex_lock(&s->mu);
    const int64_t seq = s->acquired;
    *unit = seq % s->units;
    int mine = 0;
    if (!s->error && seq == s->claimed) { /* nobody is reading it: read it here */
        *at = claim(s, seq);
        if (*at < 0) s->error = ENOBUFS; /* the ring is smaller than `ring_minimum` */
        else mine = 1;
    } else if (!s->error && s->ready[seq % s->slots] != seq + 1) {
        const double began = now();
        while (s->ready[seq % s->slots] != seq + 1 && !s->error) pthread_cond_wait(&s->changed, &s->mu);
        s->wait_seconds += now() - began;
    }
    *at = s->error ? -1 : s->position[seq % s->slots];
    pthread_mutex_unlock(&s->mu);
    return s->error ? -1 : mine;
}

int memfit_stream_read(Stream *s, int64_t unit, int64_t at, int part, int parts) {
    return read_unit(s, unit, s->ring + at, part, parts);
}

/* ``mine``: the caller's threads read the unit (``err``: the first error they met). Returns the
 * unit's position, or -1 after an error. */
int64_t memfit_stream_finish(Stream *s, int mine, int err) {
    pthread_mutex_lock(&s->mu);
    const int64_t seq = s->acquired;
    if (mine) {
        if (err) s->error = err;
        else s->ready[seq % s->slots] = seq + 1, s->bytes_read += s->size[seq % s->units];
    }
    int64_t at = -1;
    if (!s->error && s->ready[seq % s->slots] == seq + 1) {
        at = s->position[seq % s->slots];
        const int64_t unit = seq % s->units;
        for (int64_t i = s->first_patch[unit]; i < s->first_patch[unit + 1]; i++)
            *s->patches[i].field = s->ring + at + s->patches[i].offset;
        s->acquired++;
    }
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->mu);
    return at;
}

/* The next unit of the pass, read by the calling thread alone if no reader has it: its position
 * in the ring, or -1 after a read error (`memfit_stream_stats`). */
int64_t memfit_stream_acquire(Stream *s) {
    int64_t at, unit;
    const int mine = memfit_stream_claim(s, &at, &unit);
    if (mine < 0) return -1;
    const double began = now();
    const int err = mine ? read_unit(s, unit, s->ring + at, 0, 1) : 0;
    if (mine) {
        pthread_mutex_lock(&s->mu);
        s->wait_seconds += now() - began;
        pthread_mutex_unlock(&s->mu);
    }
    return memfit_stream_finish(s, mine, err);
}

/* Gives back the oldest acquired unit. */
void memfit_stream_release(Stream *s) {
    pthread_mutex_lock(&s->mu);
    if (s->released < s->acquired) s->released++;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->mu);
}

/* Units acquired in the current pass (0 at a pass boundary). */
int64_t memfit_stream_cursor(Stream *s) {
    pthread_mutex_lock(&s->mu);
    const int64_t at = s->acquired % s->units;
    pthread_mutex_unlock(&s->mu);
    return at;
}

/* stats [3]: bytes read, seconds consumers waited, the read error (errno, 0 if none). */
void memfit_stream_stats(Stream *s, double *stats) {
    pthread_mutex_lock(&s->mu);
    stats[0] = (double)s->bytes_read, stats[1] = s->wait_seconds, stats[2] = s->error;
    pthread_mutex_unlock(&s->mu);
}

void memfit_stream_close(Stream *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->mu);
    if (s->threaded) pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->changed);
    free(s->size), free(s->first_piece), free(s->first_patch), free(s->pieces), free(s->position), free(s->ready);
    free(s->patches);
    free(s);
}

/* The fraction of bytes [offset, offset + length) of file ``fd`` in the page cache (mincore over a
 * mapping that is never touched, so nothing becomes resident), or -1 if it cannot be told. */
double memfit_cached_fraction(int fd, int64_t offset, int64_t length) {
    const int64_t page = sysconf(_SC_PAGESIZE), start = offset & ~(page - 1), span = offset + length - start;
    if (length <= 0) return 1.0;
    void *map = mmap(NULL, span, PROT_READ, MAP_SHARED, fd, start);
    if (map == MAP_FAILED) return -1.0;
    const int64_t pages = (span + page - 1) / page;
    unsigned char *resident = malloc(pages);
    double fraction = -1.0;
    if (resident && mincore(map, span, resident) == 0) {
        int64_t count = 0;
        for (int64_t i = 0; i < pages; i++) count += resident[i] & 1;
        fraction = (double)count / pages;
    }
    free(resident);
    munmap(map, span);
    return fraction;
}
