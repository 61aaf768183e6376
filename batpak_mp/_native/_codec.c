/* batpak_mp._native._codec: the compiled mirror of the pure codecs in batpak_mp/_format/.
 *
 * Owns: CRC-32 (IEEE, zlib-compatible: PCLMULQDQ folding on x86-64 CPUs that have it,
 * slice-by-8 tables otherwise) and BLAKE2b (RFC 7693, key-less, with a personalization
 * parameter), and on top of them exact mirrors of
 *   _format/frame.py      encode_parts, frame_header (the frame validity rule), scan_frame,
 *                         frame_hash, hash_matches, plus encode_group (a whole commit
 *                         group in one call, prev hashes chained inside it),
 *   _format/directory.py  name_hash, idem_hash,
 *   _format/scan.py       scan_segment,
 *   _format/record.py     unpack_record (RECORD.unpack_from at a sequence's slot),
 * and of the pure functions in _native/_pure.py built on them: encode_request (one append
 * request planned and encoded: the commit path's per-event work), pack_records and
 * index_group (a commit group's records into records.idx, then its delta slots), event_at and scan_events (an Event, or a run of
 * them, straight from the frames: the reader's get, history and scan).
 *
 * Invariants: the Python modules are the reference. Every byte produced and every verdict
 * (status codes, reason strings, NamedTuple types imported from Python, never redefined)
 * is the same; tests/unit/test_native_agrees.py proves it on random, mutated, truncated
 * buffers. Buffers are any buffer-protocol object read as bytes (PyBUF_SIMPLE); every
 * Py_buffer is released on every path; nothing reads outside [buf, buf + len). Decoders
 * are total: bad bytes give a status, never an exception; only arguments of the wrong
 * type raise (TypeError, or struct.error where struct.pack would raise it).
 * No libraries beyond libc and the CPython C API (no zlib headers needed). The Python
 * types Frame, ScannedFrame and SegmentScan are imported lazily on first use, so
 * _format may later import this module without a cycle.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>  /* T_OBJECT_EX: the member type of a __slots__ slot */
#include <stdint.h>
#include <string.h>

/* -- the frame layout, mirrored from _format/frame.py (the loader checks they agree) -- */
#define FRAME_VERSION 2      /* written; versions FRAME_VERSION_MIN .. FRAME_VERSION are read */
#define FRAME_VERSION_MIN 1
#define PAYLOAD_DIGEST_SIZE 32  /* a version-2 hash covers blake2b-256 of the payload; a stub stores it */
#define HEADER_SIZE 176      /* <len u32><crc u32><hashed header 136><event_hash 32> */
#define HASHED_START 8       /* length and CRC are not part of the event */
#define HASH_OFFSET 144      /* where event_hash sits */
#define HASHED_LEN (HASH_OFFSET - HASHED_START)  /* 136 bytes: version .. prev_hash */
#define PREV_IN_HASHED 104   /* prev_hash inside the hashed header */
#define MIN_FRAME (HEADER_SIZE + 2)
#define MAX_FRAME 2147483648ULL  /* 1 << 31 */
#define FLAG_COMMIT_END 0x1
#define FLAG_HAS_CAUSATION 0x2
#define FLAG_HAS_CORRELATION 0x4
#define FLAG_FENCED 0x8
#define FLAG_REDACTED 0x10
#define KNOWN_FLAGS 0x1F
#define ST_OK 0
#define ST_EMPTY 1
#define ST_NEED_MORE 2
#define ST_BAD 3
#define RECORD_SIZE 64       /* _format/record.py: RECORD = "<QIIIHHQQQ16s" */
#define RECORDS_HEADER_SIZE 64
#if RECORDS_HEADER_SIZE != RECORD_SIZE
#error "unpack_record computes the offset as seq * RECORD_SIZE"
#endif
#ifndef BATPAK_MP_CODEC_SHA256
#define BATPAK_MP_CODEC_SHA256 ""  /* setup.py passes the source's SHA-256: the loader compares */
#endif
#define GIL_RELEASE_BYTES 65536  /* hash/encode this much or more with the GIL released */

/* -- little-endian loads and stores, byte by byte (portable; gcc makes them one move) -- */
static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | ((uint16_t)p[1] << 8)); }
static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t ld64(const uint8_t *p) { return (uint64_t)ld32(p) | ((uint64_t)ld32(p + 4) << 32); }
static inline void st16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void st64(uint8_t *p, uint64_t v) { st32(p, (uint32_t)v); st32(p + 4, (uint32_t)(v >> 32)); }

/* ====================================================================================
 * CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320): PCLMULQDQ folding on x86-64 CPUs
 * that have it, else (and for the last < 16 bytes) slice-by-8 tables; crc32_update(0, ..)
 * equals zlib.crc32(data) and crc32_update(value, ..) equals zlib.crc32(data, value).
 * ==================================================================================== */
static uint32_t crc_tab[8][256];
static void crc_detect(void);

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xFF];
    crc_detect();
}

static uint32_t crc32_table(uint32_t crc, const uint8_t *p, size_t n)  /* crc: the inverted running state */
{
    while (n >= 8) {
        uint32_t lo = ld32(p) ^ crc, hi = ld32(p + 4);
        crc = crc_tab[7][lo & 0xFF] ^ crc_tab[6][(lo >> 8) & 0xFF] ^ crc_tab[5][(lo >> 16) & 0xFF]
            ^ crc_tab[4][lo >> 24] ^ crc_tab[3][hi & 0xFF] ^ crc_tab[2][(hi >> 8) & 0xFF]
            ^ crc_tab[1][(hi >> 16) & 0xFF] ^ crc_tab[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_tab[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CRC_SIMD_MIN 64  /* below this the tables are as fast */

/* Carry-less multiplication folding (Gopal et al., "Fast CRC Computation for Generic
 * Polynomials Using PCLMULQDQ", Intel 2009; the bit-reflected constants of CRC-32 IEEE, as
 * in Chromium's zlib crc32_simd.c). n >= 64 and a multiple of 16; crc is the inverted
 * running state, as crc32_table takes it. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_pclmul(uint32_t crc, const uint8_t *buf, size_t n)
{
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8;

    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = k1k2;
    buf += 64;
    n -= 64;
    while (n >= 64) {  /* four lanes of 128 bits, folded 512 bits at a time */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        n -= 64;
    }
    x0 = k3k4;  /* the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x4), x5);
    while (n >= 16) {  /* the rest, 128 bits at a time */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), _mm_loadu_si128((const __m128i *)buf)), x5);
        buf += 16;
        n -= 16;
    }
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);  /* 128 bits to 64 */
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5k0, 0x00), x2);
    x2 = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);  /* Barrett to 32 */
    x2 = _mm_clmulepi64_si128(x2, poly, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int crc_simd;  /* the CPU has PCLMULQDQ and SSE4.1 (set by crc_init) */

static void crc_detect(void)
{
    __builtin_cpu_init();
    crc_simd = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}
#else
static const int crc_simd = 0;
static void crc_detect(void) {}
#endif

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (crc_simd && n >= CRC_SIMD_MIN) {
        size_t chunk = n & ~(size_t)15;
        crc = crc32_pclmul(crc, p, chunk);
        p += chunk;
        n -= chunk;
    }
#endif
    return ~crc32_table(crc, p, n);
}

/* ====================================================================================
 * BLAKE2b (RFC 7693): digest 1..64 bytes, no key, 16-byte personalization (zero padded,
 * as hashlib.blake2b(person=...) pads it), salt zero, sequential mode.
 * ==================================================================================== */
typedef struct {
    uint64_t h[8];
    uint64_t t[2];
    uint8_t buf[128];
    size_t buflen;
    size_t outlen;
} b2b_state;

static const uint64_t B2B_IV[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static const uint8_t B2B_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

#define B2B_G(a, b, c, d, x, y)           \
    do {                                  \
        a = a + b + (x);                  \
        d = rotr64(d ^ a, 32);            \
        c = c + d;                        \
        b = rotr64(b ^ c, 24);            \
        a = a + b + (y);                  \
        d = rotr64(d ^ a, 16);            \
        c = c + d;                        \
        b = rotr64(b ^ c, 63);            \
    } while (0)

#define B2B_ROUND(r)                                                                 \
    do {                                                                             \
        B2B_G(v0, v4, v8, v12, m[B2B_SIGMA[r][0]], m[B2B_SIGMA[r][1]]);              \
        B2B_G(v1, v5, v9, v13, m[B2B_SIGMA[r][2]], m[B2B_SIGMA[r][3]]);              \
        B2B_G(v2, v6, v10, v14, m[B2B_SIGMA[r][4]], m[B2B_SIGMA[r][5]]);             \
        B2B_G(v3, v7, v11, v15, m[B2B_SIGMA[r][6]], m[B2B_SIGMA[r][7]]);             \
        B2B_G(v0, v5, v10, v15, m[B2B_SIGMA[r][8]], m[B2B_SIGMA[r][9]]);             \
        B2B_G(v1, v6, v11, v12, m[B2B_SIGMA[r][10]], m[B2B_SIGMA[r][11]]);           \
        B2B_G(v2, v7, v8, v13, m[B2B_SIGMA[r][12]], m[B2B_SIGMA[r][13]]);            \
        B2B_G(v3, v4, v9, v14, m[B2B_SIGMA[r][14]], m[B2B_SIGMA[r][15]]);            \
    } while (0)

/* One 128-byte block. The twelve rounds are written out so every message index is a
 * constant and the state stays in registers (about 1.5x the speed of a loop over r). */
static void b2b_compress(b2b_state *S, const uint8_t *block, int last)
{
    uint64_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = ld64(block + 8 * i);
    uint64_t v0 = S->h[0], v1 = S->h[1], v2 = S->h[2], v3 = S->h[3], v4 = S->h[4], v5 = S->h[5], v6 = S->h[6],
             v7 = S->h[7], v8 = B2B_IV[0], v9 = B2B_IV[1], v10 = B2B_IV[2], v11 = B2B_IV[3],
             v12 = B2B_IV[4] ^ S->t[0], v13 = B2B_IV[5] ^ S->t[1], v14 = last ? ~B2B_IV[6] : B2B_IV[6], v15 = B2B_IV[7];
    B2B_ROUND(0);
    B2B_ROUND(1);
    B2B_ROUND(2);
    B2B_ROUND(3);
    B2B_ROUND(4);
    B2B_ROUND(5);
    B2B_ROUND(6);
    B2B_ROUND(7);
    B2B_ROUND(8);
    B2B_ROUND(9);
    B2B_ROUND(10);
    B2B_ROUND(11);
    S->h[0] ^= v0 ^ v8;
    S->h[1] ^= v1 ^ v9;
    S->h[2] ^= v2 ^ v10;
    S->h[3] ^= v3 ^ v11;
    S->h[4] ^= v4 ^ v12;
    S->h[5] ^= v5 ^ v13;
    S->h[6] ^= v6 ^ v14;
    S->h[7] ^= v7 ^ v15;
}

static inline void b2b_count(b2b_state *S, uint64_t n)
{
    S->t[0] += n;
    if (S->t[0] < n)
        S->t[1]++;
}

/* outlen 1..64; person NULL or 16 bytes */
static void b2b_init(b2b_state *S, size_t outlen, const uint8_t *person)
{
    for (int i = 0; i < 8; i++)
        S->h[i] = B2B_IV[i];
    S->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;  /* fanout 1, depth 1, key length 0 */
    if (person) {
        S->h[6] ^= ld64(person);
        S->h[7] ^= ld64(person + 8);
    }
    S->t[0] = S->t[1] = 0;
    S->buflen = 0;
    S->outlen = outlen;
}

static void b2b_update(b2b_state *S, const uint8_t *in, size_t n)
{
    if (n == 0)
        return;
    size_t fill = 128 - S->buflen;
    if (n > fill) {  /* the last block is kept back: it must be compressed with the final flag */
        memcpy(S->buf + S->buflen, in, fill);
        S->buflen = 0;
        b2b_count(S, 128);
        b2b_compress(S, S->buf, 0);
        in += fill;
        n -= fill;
        while (n > 128) {
            b2b_count(S, 128);
            b2b_compress(S, in, 0);
            in += 128;
            n -= 128;
        }
    }
    memcpy(S->buf + S->buflen, in, n);
    S->buflen += n;
}

static void b2b_final(b2b_state *S, uint8_t *out)
{
    uint8_t full[64];
    b2b_count(S, S->buflen);
    memset(S->buf + S->buflen, 0, 128 - S->buflen);
    b2b_compress(S, S->buf, 1);
    for (int i = 0; i < 8; i++)
        st64(full + 8 * i, S->h[i]);
    memcpy(out, full, S->outlen);
}

/* The event hash of a version-1 frame: blake2b-256 over the hashed header and the body
 * (entity+scope+payload). */
static void chain_hash(const uint8_t *hashed, size_t hashed_len, const uint8_t *body, size_t body_len, uint8_t *out)
{
    b2b_state S;
    b2b_init(&S, 32, NULL);
    b2b_update(&S, hashed, hashed_len);
    b2b_update(&S, body, body_len);
    b2b_final(&S, out);
}

/* frame.py's frame_hash over the region p[0:len] (already sliced): a version-2 frame
 * (len >= HEADER_SIZE, version 2, its names inside the region) hashes its 136-byte
 * header with the REDACTED bit cleared, its names and the payload's digest (a stub
 * stores the digest itself); anything else as version 1 over the clamped pieces. */
static void frame_hash_region(const uint8_t *p, long long len, uint8_t *out)
{
    if (len >= HEADER_SIZE && p[8] == 2 && p[9] == 0) {
        long long names_end = HEADER_SIZE + (long long)ld16(p + 14) + (long long)ld16(p + 16);
        if (names_end <= len) {
            const uint8_t *payload = p + names_end, *digest = payload;
            size_t plen = (size_t)(len - names_end), dlen = plen;
            uint8_t own[PAYLOAD_DIGEST_SIZE], hdr[HASHED_LEN];
            b2b_state S;
            if (!(p[10] & FLAG_REDACTED)) {
                b2b_init(&S, PAYLOAD_DIGEST_SIZE, NULL);
                b2b_update(&S, payload, plen);
                b2b_final(&S, own);
                digest = own;
                dlen = PAYLOAD_DIGEST_SIZE;
            }
            memcpy(hdr, p + HASHED_START, HASHED_LEN);
            hdr[2] &= (uint8_t)~FLAG_REDACTED;  /* flags, low byte: a stub hashes as the frame it replaced */
            b2b_init(&S, 32, NULL);
            b2b_update(&S, hdr, HASHED_LEN);
            b2b_update(&S, p + HEADER_SIZE, (size_t)(names_end - HEADER_SIZE));
            b2b_update(&S, digest, dlen);
            b2b_final(&S, out);
            return;
        }
    }
    long long h0 = len < HASHED_START ? len : HASHED_START, h1 = len < HASH_OFFSET ? len : HASH_OFFSET;
    long long b0 = len < HEADER_SIZE ? len : HEADER_SIZE;
    chain_hash(p + h0, (size_t)(h1 - h0), p + b0, (size_t)(len - b0), out);
}

/* ====================================================================================
 * Python-side helpers: lazily imported types, struct.error, argument binding.
 * ==================================================================================== */
static PyObject *StructError;       /* struct.error: what struct.pack raises */
static PyObject *FrameType;         /* batpak_mp._format.frame.Frame */
static PyObject *ScannedFrameType;  /* batpak_mp._format.scan.ScannedFrame */
static PyObject *SegmentScanType;   /* batpak_mp._format.scan.SegmentScan */
static PyObject *NamesNotUtf8;      /* batpak_mp._format.frame.NAMES_NOT_UTF8, the reason string */
static PyObject *ONE;               /* the int 1 */
static const uint8_t NO_BYTES[1];   /* stands in for a NULL pointer of an empty buffer */

static inline const uint8_t *view_bytes(const Py_buffer *view)
{
    return view->buf ? (const uint8_t *)view->buf : NO_BYTES;
}

static PyObject *import_attr(const char *module, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module);
    if (!mod)
        return NULL;
    PyObject *attr = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return attr;
}

static int load_types(void)
{
    if (SegmentScanType)
        return 0;
    PyObject *f = import_attr("batpak_mp._format.frame", "Frame");
    PyObject *s = f ? import_attr("batpak_mp._format.scan", "ScannedFrame") : NULL;
    PyObject *g = s ? import_attr("batpak_mp._format.scan", "SegmentScan") : NULL;
    PyObject *u = g ? import_attr("batpak_mp._format.frame", "NAMES_NOT_UTF8") : NULL;
    if (!u) {
        Py_XDECREF(f);
        Py_XDECREF(s);
        Py_XDECREF(g);
        return -1;
    }
    if (!PyUnicode_Check(u)) {
        Py_SETREF(u, NULL);
        PyErr_SetString(PyExc_ImportError, "NAMES_NOT_UTF8 must be a str");
    }
    if (!u || !PyType_Check(f) || !PyType_Check(s) || !PyType_Check(g) || !PyType_IsSubtype((PyTypeObject *)f, &PyTuple_Type)
        || !PyType_IsSubtype((PyTypeObject *)s, &PyTuple_Type) || !PyType_IsSubtype((PyTypeObject *)g, &PyTuple_Type)) {
        Py_DECREF(f);
        Py_DECREF(s);
        Py_DECREF(g);
        if (!u)
            return -1;
        Py_DECREF(u);
        PyErr_SetString(PyExc_ImportError, "Frame, ScannedFrame and SegmentScan must be NamedTuple classes");
        return -1;
    }
    NamesNotUtf8 = u;
    FrameType = f;
    ScannedFrameType = s;
    SegmentScanType = g;
    return 0;
}

/* A NamedTuple instance from a plain tuple (stolen), as tuple.__new__(cls, items) does:
 * the NamedTuple's own __new__ does exactly that, so skipping it changes nothing. */
static PyObject *make_named(PyObject *type, PyObject *items)
{
    if (!items)
        return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (!args)
        return NULL;
    PyObject *r = PyTuple_Type.tp_new((PyTypeObject *)type, args, NULL);
    Py_DECREF(args);
    return r;
}

/* Bind fastcall arguments to parameters by position and keyword. The first npos may be
 * given by position, the first nreq are required; missing optional ones are left NULL. */
static int bind_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                     const char *const *names, Py_ssize_t n, Py_ssize_t npos, Py_ssize_t nreq, PyObject **out)
{
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)", fname, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(key, names[j]) != 0)
            j++;
        if (j == n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, key);
            return -1;
        }
        if (out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname, names[j]);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (Py_ssize_t j = 0; j < nreq; j++) {
        if (!out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)", fname, names[j], j + 1);
            return -1;
        }
    }
    return 0;
}

/* An index-like argument as a long long; *ovf is -1/+1 when it does not fit (then *out is
 * clamped to LLONG_MIN/LLONG_MAX). TypeError when it is not an integer. */
static int as_ll(PyObject *o, long long *out, int *ovf)
{
    PyObject *idx = PyLong_Check(o) ? Py_NewRef(o) : PyNumber_Index(o);
    if (!idx)
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *ovf = overflow;
    *out = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : v;
    return 0;
}

/* struct.pack semantics for an unsigned field of at most `max`: struct.error when the
 * value is not an integer or out of range, with struct's own messages. */
static int pack_uint(PyObject *v, char code, unsigned long long max, unsigned long long *out)
{
    PyObject *idx;
    if (PyLong_Check(v))
        idx = Py_NewRef(v);
    else if (PyIndex_Check(v)) {
        idx = PyNumber_Index(v);
        if (!idx)
            return -1;
    } else {
        PyErr_SetString(StructError, "required argument is not an integer");
        return -1;
    }
    int overflow = 0;
    long long s = PyLong_AsLongLongAndOverflow(idx, &overflow);
    unsigned long long x = (unsigned long long)s;
    int bad = (s == -1 && PyErr_Occurred()) ? -1 : (overflow < 0 || (!overflow && s < 0));
    if (!bad && overflow > 0) {
        x = PyLong_AsUnsignedLongLong(idx);
        if (x == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                Py_DECREF(idx);
                return -1;
            }
            PyErr_Clear();
            bad = 1;
        }
    }
    Py_DECREF(idx);
    if (bad < 0)
        return -1;
    if (!bad && x <= max) {
        *out = x;
        return 0;
    }
    if (code == 'H')
        PyErr_SetString(StructError, "ushort format requires 0 <= number <= 65535");
    else if (code == 'I' && !(overflow < 0 || (!overflow && s < 0)))
        PyErr_SetString(StructError, "'I' format requires 0 <= number <= 4294967295");
    else
        PyErr_SetString(StructError, "argument out of range");
    return -1;
}

/* struct '16s'/'32s': bytes or bytearray, truncated or zero padded to width. */
static int pack_fixed(PyObject *v, uint8_t *dst, size_t width)
{
    const char *p;
    Py_ssize_t n;
    if (PyBytes_Check(v)) {
        p = PyBytes_AS_STRING(v);
        n = PyBytes_GET_SIZE(v);
    } else if (PyByteArray_Check(v)) {
        p = PyByteArray_AS_STRING(v);
        n = PyByteArray_GET_SIZE(v);
    } else {
        PyErr_SetString(StructError, "argument for 's' must be a bytes object");
        return -1;
    }
    size_t k = (size_t)n < width ? (size_t)n : width;
    memcpy(dst, p, k);
    memset(dst + k, 0, width - k);
    return 0;
}

/* ====================================================================================
 * crc32, blake2b, name_hash, idem_hash
 * ==================================================================================== */
static uint32_t crc32_buffer(uint32_t start, const Py_buffer *view)
{
    uint32_t crc;
    if (view->len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        crc = crc32_update(start, view_bytes(view), (size_t)view->len);
        Py_END_ALLOW_THREADS
    } else
        crc = crc32_update(start, view_bytes(view), (size_t)view->len);
    return crc;
}

static PyObject *py_crc32(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"data", "value"};
    PyObject *a[2];
    if (bind_args("crc32", args, nargs, kwnames, names, 2, 2, 1, a) < 0)
        return NULL;
    uint32_t start = 0;
    if (a[1]) {
        if (!PyLong_Check(a[1])) {
            PyErr_Format(PyExc_TypeError, "integer argument expected, got %s", Py_TYPE(a[1])->tp_name);
            return NULL;
        }
        unsigned long v = PyLong_AsUnsignedLongMask(a[1]);  /* zlib masks the start value */
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        start = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t crc = crc32_buffer(start, &view);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *py_blake2b(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"data", "digest_size", "person"};
    PyObject *a[3];
    if (bind_args("blake2b", args, nargs, kwnames, names, 3, 3, 1, a) < 0)
        return NULL;
    long long size = 64;
    int ovf = 0;
    if (a[1] && as_ll(a[1], &size, &ovf) < 0)
        return NULL;
    if (ovf || size < 1 || size > 64) {
        PyErr_SetString(PyExc_ValueError, "digest_size must be between 1 and 64 bytes");
        return NULL;
    }
    uint8_t person[16] = {0};
    if (a[2]) {
        Py_buffer pv;
        if (PyObject_GetBuffer(a[2], &pv, PyBUF_SIMPLE) < 0)
            return NULL;
        if (pv.len > 16) {
            PyBuffer_Release(&pv);
            PyErr_SetString(PyExc_ValueError, "maximum person length is 16 bytes");
            return NULL;
        }
        memcpy(person, pv.buf, (size_t)pv.len);
        PyBuffer_Release(&pv);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t out[64];
    b2b_state S;
    b2b_init(&S, (size_t)size, person);
    if (view.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        b2b_update(&S, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else
        b2b_update(&S, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    b2b_final(&S, out);
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)size);
}

static PyObject *py_name_hash(PyObject *self, PyObject *raw)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t out[8];
    b2b_state S;
    b2b_init(&S, 8, NULL);
    b2b_update(&S, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    b2b_final(&S, out);
    uint64_t h = ld64(out);
    return PyLong_FromUnsignedLongLong(h ? h : 1);  /* 0 means "no name" in the index */
}

/* b"s" + key.encode("utf-8", "surrogatepass") for str, else b"b" + bytes(key) */
static PyObject *py_idem_hash(PyObject *self, PyObject *key)
{
    (void)self;
    static const uint8_t person[16] = {'b', 'p', '-', 'i', 'd', 'e', 'm'};
    uint8_t tag;
    PyObject *raw;
    if (PyUnicode_Check(key)) {
        tag = 's';
        raw = PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");
    } else {
        tag = 'b';
        raw = PyBytes_CheckExact(key) ? Py_NewRef(key) : PyObject_CallOneArg((PyObject *)&PyBytes_Type, key);
    }
    if (!raw)
        return NULL;
    if (!PyBytes_Check(raw)) {
        Py_DECREF(raw);
        PyErr_SetString(PyExc_TypeError, "idem_hash: the key did not encode to bytes");
        return NULL;
    }
    uint8_t out[16];
    b2b_state S;
    b2b_init(&S, 16, person);
    b2b_update(&S, &tag, 1);
    b2b_update(&S, (const uint8_t *)PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    b2b_final(&S, out);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

/* ====================================================================================
 * Encoding: one event's fields -> a 136-byte hashed header and three held body buffers.
 * ==================================================================================== */
typedef struct {
    uint8_t hdr[HASHED_LEN];
    Py_buffer part[3];  /* entity, scope, payload; obj == NULL when not held */
    Py_ssize_t prev_index;  /* encode_group: an earlier item's hash is the prev hash; else -1 */
    size_t body_len;
    uint32_t frame_len;
} event_t;

static void event_release(event_t *ev)
{
    for (int i = 0; i < 3; i++)
        if (ev->part[i].obj)
            PyBuffer_Release(&ev->part[i]);
}

/* f: the 14 fields of encode_parts in order; prev may be an int index when allow_index
 * (encode_group, item number `pos`). On error the buffers already held are released. */
static int event_fill(event_t *ev, PyObject *const *f, int allow_index, Py_ssize_t pos)
{
    static const char codes[6] = {'H', 'H', 'H', 'Q', 'Q', 'Q'};
    static const unsigned long long maxes[6] = {0xFFFF, 0xFFFF, 0xFFFF, ~0ULL, ~0ULL, ~0ULL};
    unsigned long long v[6];
    uint8_t *h = ev->hdr;
    ev->prev_index = -1;
    for (int i = 0; i < 3; i++) {
        if (PyObject_GetBuffer(f[11 + i], &ev->part[i], PyBUF_SIMPLE) < 0)
            goto fail;
    }
    for (int i = 0; i < 6; i++)  /* flags, kind, payload_version, global_sequence, entity_clock, wall_ms */
        if (pack_uint(f[i], codes[i], maxes[i], &v[i]) < 0)
            goto fail;
    size_t elen = (size_t)ev->part[0].len, slen = (size_t)ev->part[1].len, plen = (size_t)ev->part[2].len;
    if (elen > 0xFFFF || slen > 0xFFFF) {
        PyErr_SetString(StructError, "ushort format requires 0 <= number <= 65535");
        goto fail;
    }
    if (plen > 0xFFFFFFFFULL) {
        PyErr_SetString(StructError, "'I' format requires 0 <= number <= 4294967295");
        goto fail;
    }
    st16(h + 0, FRAME_VERSION);
    st16(h + 2, (uint16_t)v[0]);
    st16(h + 4, (uint16_t)v[1]);
    st16(h + 6, (uint16_t)elen);
    st16(h + 8, (uint16_t)slen);
    st16(h + 10, (uint16_t)v[2]);
    st32(h + 12, (uint32_t)plen);
    st64(h + 16, v[3]);
    st64(h + 24, v[4]);
    st64(h + 32, v[5]);
    for (int i = 0; i < 4; i++)  /* event_id, causation_id, correlation_id, idem_hash */
        if (pack_fixed(f[6 + i], h + 40 + 16 * i, 16) < 0)
            goto fail;
    if (allow_index && PyLong_Check(f[10])) {
        Py_ssize_t idx = PyLong_AsSsize_t(f[10]);
        if (idx == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                goto fail;
            PyErr_Clear();
        }
        if (idx < 0 || idx >= pos) {
            PyErr_Format(PyExc_IndexError, "encode_group: item %zd names item %R as its predecessor, "
                         "which is not an earlier item", pos, f[10]);
            goto fail;
        }
        ev->prev_index = idx;
        memset(h + PREV_IN_HASHED, 0, 32);
    } else if (pack_fixed(f[10], h + PREV_IN_HASHED, 32) < 0)
        goto fail;
    ev->body_len = elen + slen + plen;
    if (HEADER_SIZE + (unsigned long long)ev->body_len > 0xFFFFFFFFULL) {
        PyErr_SetString(StructError, "'I' format requires 0 <= number <= 4294967295");
        goto fail;
    }
    ev->frame_len = (uint32_t)(HEADER_SIZE + ev->body_len);
    return 0;
fail:
    event_release(ev);
    return -1;
}

/* Write the frame of `ev` at out (frame_len bytes): header, body, event hash, length, CRC.
 * prev: the 32-byte predecessor hash when the event names one by index, else NULL. */
static void event_write(const event_t *ev, const uint8_t *prev, uint8_t *out, uint8_t *hash_out)
{
    uint8_t *body = out + HEADER_SIZE;
    memcpy(out + HASHED_START, ev->hdr, HASHED_LEN);
    if (prev)
        memcpy(out + HASHED_START + PREV_IN_HASHED, prev, 32);
    size_t pos = 0;
    for (int i = 0; i < 3; i++) {
        if (ev->part[i].len)
            memcpy(body + pos, ev->part[i].buf, (size_t)ev->part[i].len);
        pos += (size_t)ev->part[i].len;
    }
    frame_hash_region(out, (long long)ev->frame_len, out + HASH_OFFSET);  /* version 2: over the payload's digest */
    memcpy(hash_out, out + HASH_OFFSET, 32);
    st32(out, ev->frame_len);
    st32(out + 4, crc32_update(0, out + HASHED_START, ev->frame_len - HASHED_START));
}

static void write_group(const event_t *evs, Py_ssize_t n, uint8_t *out, uint8_t *hashes)
{
    size_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *prev = evs[i].prev_index >= 0 ? hashes + 32 * (size_t)evs[i].prev_index : NULL;
        event_write(&evs[i], prev, out + pos, hashes + 32 * (size_t)i);
        pos += evs[i].frame_len;
    }
}

static const char *const ENCODE_NAMES[14] = {
    "flags", "kind", "payload_version", "global_sequence", "entity_clock", "wall_ms", "event_id",
    "causation_id", "correlation_id", "idem_hash", "prev_hash", "entity", "scope", "payload",
};

/* encode_parts(...) -> ((len_crc, hashed, event_hash, body), event_hash, frame_len) */
static PyObject *py_encode_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    PyObject *f[14];
    if (bind_args("encode_parts", args, nargs, kwnames, ENCODE_NAMES, 14, 14, 14, f) < 0)
        return NULL;
    event_t ev;
    memset(&ev, 0, sizeof ev);
    if (event_fill(&ev, f, 0, 0) < 0)
        return NULL;
    PyObject *frame = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)ev.frame_len);
    if (!frame) {
        event_release(&ev);
        return NULL;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(frame), hash[32];
    event_write(&ev, NULL, out, hash);
    event_release(&ev);
    PyObject *len_crc = PyBytes_FromStringAndSize((const char *)out, HASHED_START);
    PyObject *hashed = PyBytes_FromStringAndSize((const char *)out + HASHED_START, HASHED_LEN);
    PyObject *ehash = PyBytes_FromStringAndSize((const char *)hash, 32);
    PyObject *body = PyBytes_FromStringAndSize((const char *)out + HEADER_SIZE, (Py_ssize_t)ev.body_len);
    Py_DECREF(frame);
    if (!len_crc || !hashed || !ehash || !body) {
        Py_XDECREF(len_crc);
        Py_XDECREF(hashed);
        Py_XDECREF(ehash);
        Py_XDECREF(body);
        return NULL;
    }
    PyObject *pieces = PyTuple_Pack(4, len_crc, hashed, ehash, body);
    Py_DECREF(len_crc);
    Py_DECREF(hashed);
    Py_DECREF(body);
    PyObject *r = pieces ? Py_BuildValue("(NOk)", pieces, ehash, (unsigned long)ev.frame_len) : NULL;
    Py_DECREF(ehash);
    return r;
}

/* encode_group(items) -> (frames joined, [event_hash, ...], [frame_len, ...]). Each item is
 * a sequence of the 14 encode_parts fields; its prev_hash may be the int index of an
 * earlier item, whose event hash is then used (the chain inside one commit group). */
static PyObject *py_encode_group(PyObject *self, PyObject *items)
{
    (void)self;
    /* tuples, not lists: an __index__ met on the way could mutate a list under us */
    PyObject *seq = PySequence_Tuple(items);
    if (!seq)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), filled = 0;
    event_t *evs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(event_t));
    uint8_t *hashes = PyMem_Malloc(n ? 32 * (size_t)n : 1);
    PyObject *joined = NULL, *hash_list = NULL, *len_list = NULL, *result = NULL;
    if (!evs || !hashes) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fields = PySequence_Tuple(PyTuple_GET_ITEM(seq, i));
        if (!fields)
            goto done;
        if (PyTuple_GET_SIZE(fields) != 14) {
            PyErr_Format(PyExc_TypeError, "encode_group: item %zd has %zd fields, expected the 14 of encode_parts",
                         i, PyTuple_GET_SIZE(fields));
            Py_DECREF(fields);
            goto done;
        }
        int rc = event_fill(&evs[i], &PyTuple_GET_ITEM(fields, 0), 1, i);
        Py_DECREF(fields);  /* the held buffers keep entity, scope and payload alive */
        if (rc < 0)
            goto done;
        filled = i + 1;
        total += evs[i].frame_len;
        if (total > (size_t)PY_SSIZE_T_MAX) {
            PyErr_SetString(PyExc_OverflowError, "encode_group: the group is larger than a bytes object can be");
            goto done;
        }
    }
    joined = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!joined)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(joined);
    if (total >= GIL_RELEASE_BYTES) {  /* only our own memory and held buffers in there */
        Py_BEGIN_ALLOW_THREADS
        write_group(evs, n, out, hashes);
        Py_END_ALLOW_THREADS
    } else
        write_group(evs, n, out, hashes);
    hash_list = PyList_New(n);
    len_list = hash_list ? PyList_New(n) : NULL;
    if (!len_list)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyBytes_FromStringAndSize((const char *)hashes + 32 * i, 32);
        PyObject *l = h ? PyLong_FromUnsignedLong(evs[i].frame_len) : NULL;
        if (!l) {
            Py_XDECREF(h);
            goto done;
        }
        PyList_SET_ITEM(hash_list, i, h);
        PyList_SET_ITEM(len_list, i, l);
    }
    result = PyTuple_Pack(3, joined, hash_list, len_list);
done:
    if (evs)
        for (Py_ssize_t i = 0; i < filled; i++)
            event_release(&evs[i]);
    PyMem_Free(evs);
    PyMem_Free(hashes);
    Py_XDECREF(joined);
    Py_XDECREF(hash_list);
    Py_XDECREF(len_list);
    Py_DECREF(seq);
    return result;
}

/* Python slice semantics of buf[start:stop] on a buffer of length n (clamped, never
 * negative length). */
static void slice_adjust(long long n, long long start, long long stop, long long *lo, long long *len)
{
    if (start < 0) {
        start += n;
        if (start < 0)
            start = 0;
    } else if (start > n)
        start = n;
    if (stop < 0) {
        stop += n;
        if (stop < 0)
            stop = 0;
    } else if (stop > n)
        stop = n;
    *lo = start;
    *len = stop > start ? stop - start : 0;
}

static inline long long clamp_ll(long long v, long long hi) { return v < hi ? v : hi; }

/* ====================================================================================
 * Decoding: frame_header, the one frame validity rule (_format/frame.py), shared by
 * scan_frame, scan_segment and frame_header itself.
 * ==================================================================================== */
typedef struct {
    uint32_t frame_len, crc, plen;
    uint16_t version, flags, kind, elen, slen, pv;
    uint64_t seq, clock, wall;
} header_t;

enum { HV_VALID, HV_END, HV_NEED, HV_BAD };
enum { WHY_NONE, WHY_LEN_RANGE, WHY_CRC, WHY_VERSION, WHY_LENGTHS, WHY_EMPTY_NAME, WHY_FLAGS };

/* any(buf[lo:hi]) with Python's slice semantics (negative ends count from the end) */
static int any_in_slice(const uint8_t *base, long long len, long long lo, long long hi)
{
    long long start, n;
    slice_adjust(len, lo, hi, &start, &n);
    for (long long i = 0; i < n; i++)
        if (base[start + i])
            return 1;
    return 0;
}

/* frame_header(buf, off, limit, final=final) for 0 <= off <= len and limit <= len
 * (limit may be below off). HV_VALID fills *h; HV_NEED sets *need; HV_BAD sets *why;
 * HV_END is the end marker. Reads nothing outside [base, base + len). */
static int header_at(const uint8_t *base, long long len, long long off, long long limit, int final, header_t *h,
                     int *why, uint32_t *need)
{
    long long n = limit - off;
    *why = WHY_NONE;
    if (n < 8) {
        if ((n >= 4 && ld32(base + off) == 0) || (final && !any_in_slice(base, len, off, limit)))
            return HV_END;
        *need = 8;
        return HV_NEED;
    }
    const uint8_t *p = base + off;
    h->frame_len = ld32(p);
    h->crc = ld32(p + 4);
    if (h->frame_len == 0)
        return HV_END;
    if (h->frame_len < MIN_FRAME || h->frame_len > MAX_FRAME) {
        *why = WHY_LEN_RANGE;
        return HV_BAD;
    }
    if ((unsigned long long)n < h->frame_len) {
        *need = h->frame_len;
        return HV_NEED;
    }
    if (crc32_update(0, p + HASHED_START, h->frame_len - HASHED_START) != h->crc) {
        *why = WHY_CRC;
        return HV_BAD;
    }
    const uint8_t *q = p + HASHED_START;
    h->version = ld16(q);
    h->flags = ld16(q + 2);
    h->kind = ld16(q + 4);
    h->elen = ld16(q + 6);
    h->slen = ld16(q + 8);
    h->pv = ld16(q + 10);
    h->plen = ld32(q + 12);
    h->seq = ld64(q + 16);
    h->clock = ld64(q + 24);
    h->wall = ld64(q + 32);
    if (h->version < FRAME_VERSION_MIN || h->version > FRAME_VERSION)
        *why = WHY_VERSION;
    else if ((unsigned long long)HEADER_SIZE + h->elen + h->slen
             + (h->flags & FLAG_REDACTED ? PAYLOAD_DIGEST_SIZE : h->plen) != h->frame_len)
        *why = WHY_LENGTHS;
    else if (h->elen == 0 || h->slen == 0)
        *why = WHY_EMPTY_NAME;
    else if ((h->flags & ~KNOWN_FLAGS) || (h->version == 1 && (h->flags & FLAG_REDACTED)))
        *why = WHY_FLAGS;
    return *why ? HV_BAD : HV_VALID;
}

/* frame_header's reason string for a HV_BAD verdict */
static PyObject *bad_reason(int why, const header_t *h)
{
    switch (why) {
    case WHY_LEN_RANGE: return PyUnicode_FromFormat("frame length %lu out of range", (unsigned long)h->frame_len);
    case WHY_CRC: return PyUnicode_FromString("checksum mismatch");
    case WHY_VERSION:
        return PyUnicode_FromFormat(h->version > FRAME_VERSION ? "future frame version %u" : "unknown frame version %u",
                                    (unsigned)h->version);
    case WHY_LENGTHS: return PyUnicode_FromString("field lengths do not add up to the frame length");
    case WHY_EMPTY_NAME: return PyUnicode_FromString("empty entity or scope");
    default: return PyUnicode_FromFormat("unknown flags 0x%x", (unsigned)h->flags);
    }
}

/* Strict UTF-8, as bytes.decode("utf-8") accepts it: no overlong forms, no surrogates,
 * nothing above U+10FFFF (Unicode 15, table 3-7). */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n && (ld64(s + i) & 0x8080808080808080ULL) == 0) {
            i += 8;
            continue;
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (n - i < 3 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] >= 0xA0))
                return 0;  /* overlong, or a surrogate */
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (n - i < 4 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] >= 0x90))
                return 0;  /* overlong, or above U+10FFFF */
            i += 4;
        } else
            return 0;
    }
    return 1;
}

/* frame_names: are the entity and scope of a valid frame at p UTF-8? */
static inline int names_valid(const uint8_t *p, const header_t *h)
{
    return utf8_valid(p + HEADER_SIZE, h->elen) && utf8_valid(p + HEADER_SIZE + h->elen, h->slen);
}

static inline PyObject *bytes_at(const uint8_t *p, size_t n) { return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n); }

static PyObject *status_pair(int status, PyObject *value)
{
    if (!value)
        return NULL;
    return Py_BuildValue("(iN)", status, value);
}

/* The Frame of a valid frame at p (frame_from_header). */
static PyObject *frame_object(const uint8_t *p, const header_t *h)
{
    const uint8_t *e = p + HEADER_SIZE, *s = e + h->elen, *pl = s + h->slen;
    PyObject *items = Py_BuildValue(
        "(kiiiKKKNNNNNNNNN)", (unsigned long)h->frame_len, (int)h->flags, (int)h->kind, (int)h->pv,
        (unsigned long long)h->seq, (unsigned long long)h->clock, (unsigned long long)h->wall,
        bytes_at(p + 48, 16), bytes_at(p + 64, 16), bytes_at(p + 80, 16), bytes_at(p + 96, 16),
        bytes_at(p + 112, 32), bytes_at(p + HASH_OFFSET, 32), bytes_at(e, h->elen), bytes_at(s, h->slen),
        bytes_at(pl, h->flags & FLAG_REDACTED ? PAYLOAD_DIGEST_SIZE : h->plen));  /* a stub: the digest */
    return make_named(FrameType, items);
}

/* scan_frame(buf, off, limit, *, final=False) -> (OK, Frame) | (EMPTY, None) | (NEED_MORE, n) | (BAD, reason) */
static PyObject *py_scan_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "limit", "final"};
    PyObject *a[4];
    if (bind_args("scan_frame", args, nargs, kwnames, names, 4, 3, 3, a) < 0)
        return NULL;
    if (load_types() < 0)
        return NULL;
    int final = a[3] ? PyObject_IsTrue(a[3]) : 0;
    if (final < 0)
        return NULL;
    long long off, limit;
    int ovf_off, ovf_limit;
    if (as_ll(a[1], &off, &ovf_off) < 0 || as_ll(a[2], &limit, &ovf_limit) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *base = view_bytes(&view);
    PyObject *r;
    if (ovf_off || ovf_limit || off < 0 || limit > view.len || off > limit) {
        r = status_pair(ST_BAD, PyUnicode_FromFormat("offset %S outside buffer of %zd bytes (limit %S)", a[1], view.len, a[2]));
        goto done;
    }
    header_t h;
    int why;
    uint32_t need;
    switch (header_at(base, view.len, off, limit, final, &h, &why, &need)) {
    case HV_END: r = Py_BuildValue("(iO)", ST_EMPTY, Py_None); break;
    case HV_NEED: r = Py_BuildValue("(ik)", ST_NEED_MORE, (unsigned long)need); break;
    case HV_BAD: r = status_pair(ST_BAD, bad_reason(why, &h)); break;
    default:
        if (!names_valid(base + off, &h))
            r = Py_BuildValue("(iO)", ST_BAD, NamesNotUtf8);
        else
            r = status_pair(ST_OK, frame_object(base + off, &h));
    }
done:
    PyBuffer_Release(&view);
    return r;
}

/* frame_header(buf, off, limit, *, final=False) -> the 18 HEADER fields | int | str.
 * The Python function requires 0 <= off and limit <= len(buf) (scan_frame checks them);
 * here a call outside that raises ValueError instead of reading past the buffer. */
static PyObject *py_frame_header(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "limit", "final"};
    PyObject *a[4];
    if (bind_args("frame_header", args, nargs, kwnames, names, 4, 3, 3, a) < 0)
        return NULL;
    int final = a[3] ? PyObject_IsTrue(a[3]) : 0;
    if (final < 0)
        return NULL;
    long long off, limit;
    int ovf_off, ovf_limit;
    if (as_ll(a[1], &off, &ovf_off) < 0 || as_ll(a[2], &limit, &ovf_limit) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *base = view_bytes(&view);
    PyObject *r;
    if (off < 0 || limit > view.len) {  /* (an overflowing off or limit is LLONG_MIN or LLONG_MAX here) */
        PyErr_Format(PyExc_ValueError, "frame_header: offset %S or limit %S outside buffer of %zd bytes", a[1], a[2],
                     view.len);
        r = NULL;
        goto done;
    }
    if (off > view.len)
        off = view.len;  /* past the end and past limit: the same verdict (nothing to read) */
    if (limit < -(long long)view.len)
        limit = -(long long)view.len;  /* buf[off:limit] is empty from there down; limit - off cannot overflow */
    header_t h;
    int why;
    uint32_t need;
    switch (header_at(base, view.len, off, limit, final, &h, &why, &need)) {
    case HV_END: r = PyLong_FromLong(0); break;
    case HV_NEED: r = PyLong_FromUnsignedLong(need); break;
    case HV_BAD: r = bad_reason(why, &h); break;
    default: {
        const uint8_t *p = base + off;
        r = Py_BuildValue("(kkiiiiiikKKKNNNNNN)", (unsigned long)h.frame_len, (unsigned long)h.crc, (int)h.version,
                          (int)h.flags, (int)h.kind, (int)h.elen, (int)h.slen, (int)h.pv, (unsigned long)h.plen,
                          (unsigned long long)h.seq, (unsigned long long)h.clock, (unsigned long long)h.wall,
                          bytes_at(p + 48, 16), bytes_at(p + 64, 16), bytes_at(p + 80, 16), bytes_at(p + 96, 16),
                          bytes_at(p + 112, 32), bytes_at(p + HASH_OFFSET, 32));
    }
    }
done:
    PyBuffer_Release(&view);
    return r;
}

/* frame_hash over memoryview(buf)[off:off + frame_len] (Python slicing, clipped) into out */
static int frame_hash_into(const Py_buffer *view, PyObject *off_obj, PyObject *flen_obj, uint8_t *out)
{
    long long n = view->len, lo, len, off, flen;
    int ovf1, ovf2;
    if (as_ll(off_obj, &off, &ovf1) < 0 || as_ll(flen_obj, &flen, &ovf2) < 0)
        return -1;
    if (!ovf1 && !ovf2 && off > -(1LL << 62) && off < (1LL << 62) && flen > -(1LL << 62) && flen < (1LL << 62)) {
        slice_adjust(n, off, off + flen, &lo, &len);
    } else {  /* huge numbers: let Python do the slice arithmetic */
        PyObject *stop = PyNumber_Add(off_obj, flen_obj);
        PyObject *slice = stop ? PySlice_New(off_obj, stop, NULL) : NULL;
        Py_XDECREF(stop);
        Py_ssize_t start, end, step;
        if (!slice)
            return -1;
        int rc = PySlice_Unpack(slice, &start, &end, &step);
        Py_DECREF(slice);
        if (rc < 0)
            return -1;
        len = PySlice_AdjustIndices((Py_ssize_t)n, &start, &end, step);
        lo = start;
    }
    frame_hash_region(view_bytes(view) + lo, len, out);
    return 0;
}

/* frame_hash(buf, off, frame_len) -> the event hash the frame's bytes give */
static PyObject *py_frame_hash(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "frame_len"};
    PyObject *a[3];
    if (bind_args("frame_hash", args, nargs, kwnames, names, 3, 3, 3, a) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t digest[32];
    int rc = frame_hash_into(&view, a[1], a[2], digest);
    PyBuffer_Release(&view);
    return rc < 0 ? NULL : bytes_at(digest, 32);
}

/* hash_matches(buf, off, frame) == (frame_hash(buf, off, frame.frame_len) == frame.event_hash) */
static PyObject *py_hash_matches(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "frame"};
    PyObject *a[3];
    if (bind_args("hash_matches", args, nargs, kwnames, names, 3, 3, 3, a) < 0)
        return NULL;
    PyObject *flen = PyObject_GetAttrString(a[2], "frame_len");
    if (!flen)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(flen);
        return NULL;
    }
    uint8_t digest[32];
    int rc = frame_hash_into(&view, a[1], flen, digest);
    PyBuffer_Release(&view);
    Py_DECREF(flen);
    if (rc < 0)
        return NULL;
    PyObject *ehash = PyObject_GetAttrString(a[2], "event_hash");
    PyObject *mine = ehash ? bytes_at(digest, 32) : NULL;
    int eq = mine ? PyObject_RichCompareBool(mine, ehash, Py_EQ) : -1;
    Py_XDECREF(ehash);
    Py_XDECREF(mine);
    return eq < 0 ? NULL : PyBool_FromLong(eq);
}

/* ====================================================================================
 * scan_segment: the recovery scan of _format/scan.py.
 * ==================================================================================== */

/* The expected next sequence: a C integer while it is a plain int in [0, 2**64), else
 * any Python object, compared and incremented the way Python does. */
typedef struct {
    int small;
    unsigned long long v;
    PyObject *obj;  /* owned when !small */
} seqnext_t;

static int seqnext_init(seqnext_t *s, PyObject *o)
{
    s->obj = NULL;
    s->small = 0;
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (!overflow && v >= 0) {
            s->small = 1;
            s->v = (unsigned long long)v;
            return 0;
        }
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
                s->small = 1;
                s->v = u;
                return 0;
            }
            PyErr_Clear();
        }
    }
    s->obj = Py_NewRef(o);
    return 0;
}

/* 1 when seq == next + delta, 0 when not, -1 on error */
static int seqnext_equals(const seqnext_t *s, unsigned long long seq, int delta)
{
    if (s->small) {
        if (delta && s->v == ~0ULL)
            return 0;
        return seq == s->v + (unsigned long long)delta;
    }
    PyObject *want = delta ? PyNumber_Add(s->obj, ONE) : Py_NewRef(s->obj);
    PyObject *got = want ? PyLong_FromUnsignedLongLong(seq) : NULL;
    int r = got ? PyObject_RichCompareBool(got, want, Py_EQ) : -1;
    Py_XDECREF(want);
    Py_XDECREF(got);
    return r;
}

static int seqnext_increment(seqnext_t *s)
{
    if (s->small && s->v != ~0ULL) {
        s->v++;
        return 0;
    }
    PyObject *cur = s->small ? PyLong_FromUnsignedLongLong(s->v) : s->obj;
    if (!cur)
        return -1;
    PyObject *next = PyNumber_Add(cur, ONE);
    Py_DECREF(cur);
    s->small = 0;
    s->obj = next;
    return next ? 0 : -1;
}

static PyObject *seqnext_str(const seqnext_t *s)
{
    if (s->small)
        return PyUnicode_FromFormat("%llu", s->v);
    return PyObject_Format(s->obj, NULL);
}

static PyObject *scanned_frame(const uint8_t *base, long long off, const header_t *h)
{
    const uint8_t *p = base + off, *e = p + HEADER_SIZE;
    PyObject *items = Py_BuildValue("(LkiiKKNNNNN)", off, (unsigned long)h->frame_len, (int)h->flags, (int)h->kind,
                                    (unsigned long long)h->seq, (unsigned long long)h->clock, bytes_at(e, h->elen),
                                    bytes_at(e + h->elen, h->slen), bytes_at(p + 96, 16), bytes_at(p + 112, 32),
                                    bytes_at(p + HASH_OFFSET, 32));
    return make_named(ScannedFrameType, items);
}

/* One step of the scan: append the frame at off when it continues the log; else set
 * *status and *reason and return 1 (stop). -1 on error. */
static int scan_step(const uint8_t *base, long long len, long long off, long long limit, seqnext_t *next,
                     int check_hash, PyObject *frames, PyObject *hash_errors, header_t *h, int *status,
                     PyObject **reason)
{
    int why;
    uint32_t need;
    switch (header_at(base, len, off, limit, 1, h, &why, &need)) {
    case HV_BAD:
        *status = ST_BAD;
        *reason = bad_reason(why, h);
        return *reason ? 1 : -1;
    case HV_END:
        *status = ST_EMPTY;
        *reason = PyUnicode_FromString(limit - off >= 8 ? "end of data" : "end of segment");
        return *reason ? 1 : -1;
    case HV_NEED:
        *status = ST_NEED_MORE;
        *reason = limit - off >= 8 ? PyUnicode_FromFormat("frame of %lu bytes runs past the end", (unsigned long)need)
                                   : PyUnicode_FromString("truncated length word");
        return *reason ? 1 : -1;
    default:
        break;
    }
    const uint8_t *p = base + off;
    if (!names_valid(p, h)) {
        *status = ST_BAD;
        *reason = Py_NewRef(NamesNotUtf8);
        return 1;
    }
    int match = seqnext_equals(next, h->seq, 0);
    if (match < 0)
        return -1;
    if (!match) {
        PyObject *want = seqnext_str(next);
        if (!want)
            return -1;
        *status = ST_OK;  /* a sequence jump stopped the scan */
        *reason = PyUnicode_FromFormat("sequence %llu where %U was expected", (unsigned long long)h->seq, want);
        Py_DECREF(want);
        return *reason ? 1 : -1;
    }
    if (check_hash) {
        uint8_t digest[32];
        frame_hash_region(p, (long long)h->frame_len, digest);
        if (memcmp(digest, p + HASH_OFFSET, 32) != 0) {
            PyObject *err = Py_BuildValue("(LN)", off, PyUnicode_FromFormat("event hash mismatch at sequence %llu",
                                                                            (unsigned long long)h->seq));
            int rc = err ? PyList_Append(hash_errors, err) : -1;
            Py_XDECREF(err);
            if (rc < 0)
                return -1;
        }
    }
    PyObject *sf = scanned_frame(base, off, h);
    int rc = sf ? PyList_Append(frames, sf) : -1;
    Py_XDECREF(sf);
    return rc < 0 || seqnext_increment(next) < 0 ? -1 : 0;
}

/* After a bad frame: does its stated length lead to a frame that continues the log? */
static int damage_mid_log(const uint8_t *base, long long len, long long off, long long limit, const seqnext_t *next)
{
    uint32_t flen = limit - off >= 8 ? ld32(base + off) : 0;
    long long nxt = off + (long long)flen;
    header_t h;
    int why;
    uint32_t need;
    if (flen < MIN_FRAME || flen > MAX_FRAME || nxt >= limit)
        return 0;
    if (header_at(base, len, nxt, limit, 1, &h, &why, &need) != HV_VALID || !names_valid(base + nxt, &h))
        return 0;  /* scan_frame would not say OK */
    return seqnext_equals(next, h.seq, 1);
}

/* scan_segment(buf, start, limit, expect_seq, *, check_hash=False) -> SegmentScan */
static PyObject *py_scan_segment(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "start", "limit", "expect_seq", "check_hash"};
    PyObject *a[5];
    if (bind_args("scan_segment", args, nargs, kwnames, names, 5, 4, 4, a) < 0)
        return NULL;
    if (load_types() < 0)
        return NULL;
    int check_hash = a[4] ? PyObject_IsTrue(a[4]) : 0;
    if (check_hash < 0)
        return NULL;
    long long start, limit;
    int ovf_start, ovf_limit;
    if (as_ll(a[1], &start, &ovf_start) < 0 || as_ll(a[2], &limit, &ovf_limit) < 0)
        return NULL;
    seqnext_t next;
    if (seqnext_init(&next, a[3]) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(next.obj);
        return NULL;
    }
    const uint8_t *base = view_bytes(&view);
    long long n = view.len;
    PyObject *frames = PyList_New(0), *hash_errors = PyList_New(0), *reason = NULL, *result = NULL;
    if (!frames || !hash_errors)
        goto done;
    if (ovf_start || start < 0 || start > n) {
        reason = PyUnicode_FromFormat("start %S outside buffer of %zd bytes", a[1], (Py_ssize_t)n);
        if (reason)
            result = Py_BuildValue("(OiOOiOOO)", frames, 0, a[1], a[1], ST_BAD, reason, Py_False, hash_errors);
        goto done;
    }
    if (limit > n)
        limit = n;  /* never read past the buffer, whatever the caller says */
    if (limit < -n)
        limit = -n;  /* buf[off:limit] is empty from there down; and limit - off cannot overflow */
    long long off = start, commit_end = start;
    Py_ssize_t committed = 0;
    int status = ST_EMPTY, rc;
    header_t h;
    while ((rc = scan_step(base, n, off, limit, &next, check_hash, frames, hash_errors, &h, &status, &reason)) == 0) {
        off += h.frame_len;
        if (h.flags & FLAG_COMMIT_END) {
            committed = PyList_GET_SIZE(frames);
            commit_end = off;
        }
    }
    if (rc < 0)
        goto done;
    int damaged = status == ST_BAD ? damage_mid_log(base, n, off, limit, &next) : 0;
    if (damaged < 0)
        goto done;
    PyObject *ce = commit_end == start ? Py_NewRef(a[1]) : PyLong_FromLongLong(commit_end);
    PyObject *so = off == start ? Py_NewRef(a[1]) : PyLong_FromLongLong(off);
    if (ce && so)
        result = Py_BuildValue("(OnOOiOOO)", frames, committed, ce, so, status, reason,
                               damaged ? Py_True : Py_False, hash_errors);
    Py_XDECREF(ce);
    Py_XDECREF(so);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(next.obj);
    Py_XDECREF(frames);
    Py_XDECREF(hash_errors);
    Py_XDECREF(reason);
    return result ? make_named(SegmentScanType, result) : NULL;
}

/* ====================================================================================
 * unpack_record(buf, seq) == RECORD.unpack_from(buf, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)
 * ==================================================================================== */
static PyObject *py_unpack_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "seq"};
    PyObject *a[2];
    if (bind_args("unpack_record", args, nargs, kwnames, names, 2, 2, 2, a) < 0)
        return NULL;
    long long seq;
    int ovf;
    if (as_ll(a[1], &seq, &ovf) < 0)
        return NULL;
    /* RECORDS_HEADER_SIZE == RECORD_SIZE, so the offset is seq * RECORD_SIZE */
    if (ovf || seq > (long long)(PY_SSIZE_T_MAX / RECORD_SIZE) || seq < (long long)(PY_SSIZE_T_MIN / RECORD_SIZE)) {
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to C ssize_t");
        return NULL;
    }
    Py_ssize_t off = (Py_ssize_t)seq * RECORD_SIZE;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = NULL;
    if (off < 0) {  /* struct.unpack_from counts a negative offset from the end */
        if (off + RECORD_SIZE > 0) {
            PyErr_Format(StructError, "not enough data to unpack %d bytes at offset %zd", RECORD_SIZE, off);
            goto done;
        }
        if (off + view.len < 0) {
            PyErr_Format(StructError, "offset %zd out of range for %zd-byte buffer", off, view.len);
            goto done;
        }
        off += view.len;
    }
    if (view.len - off < RECORD_SIZE) {
        PyErr_Format(StructError,
                     "unpack_from requires a buffer of at least %zu bytes for unpacking %d bytes at offset %zd "
                     "(actual buffer size is %zd)", (size_t)RECORD_SIZE + (size_t)off, RECORD_SIZE, off, view.len);
        goto done;
    }
    const uint8_t *p = view_bytes(&view) + off;
    r = Py_BuildValue("(KkkkiiKKKN)", (unsigned long long)ld64(p), (unsigned long)ld32(p + 8),
                      (unsigned long)ld32(p + 12), (unsigned long)ld32(p + 16), (int)ld16(p + 20), (int)ld16(p + 22),
                      (unsigned long long)ld64(p + 24), (unsigned long long)ld64(p + 32),
                      (unsigned long long)ld64(p + 40), bytes_at(p + 48, 16));
done:
    PyBuffer_Release(&view);
    return r;
}

/* ====================================================================================
 * pack_records(buf, metas, segment_id, offset): _pure.pack_records, the records of a
 * published group written into records.idx exactly as RECORD.pack_into writes them
 * (the record zeroed, then each field in order: an error leaves the same bytes behind).
 * ==================================================================================== */
static int pack_field(PyObject *v, char code, uint8_t *dst)
{
    unsigned long long x;
    switch (code) {
    case 'Q':
        if (pack_uint(v, 'Q', ~0ULL, &x) < 0)
            return -1;
        st64(dst, x);
        return 0;
    case 'I':
        if (pack_uint(v, 'I', 0xFFFFFFFFULL, &x) < 0)
            return -1;
        st32(dst, (uint32_t)x);
        return 0;
    default:
        if (pack_uint(v, 'H', 0xFFFF, &x) < 0)
            return -1;
        st16(dst, (uint16_t)x);
        return 0;
    }
}

/* Where RECORD.pack_into(buf, seq * RECORD_SIZE, ...) packs in a buffer of len bytes
 * (seq already an int that fits), with struct's errors; -1 raised. */
static Py_ssize_t record_slot(long long seq, int ovf, Py_ssize_t len)
{
    if (ovf || seq > (long long)(PY_SSIZE_T_MAX / RECORD_SIZE) || seq < (long long)(PY_SSIZE_T_MIN / RECORD_SIZE)) {
        PyErr_SetString(PyExc_IndexError, "cannot fit 'int' into an index-sized integer");
        return -1;
    }
    Py_ssize_t off = (Py_ssize_t)seq * RECORD_SIZE;  /* RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE */
    if (off < 0) {  /* struct counts a negative offset from the end */
        if (off + RECORD_SIZE > 0) {
            PyErr_Format(StructError, "no space to pack %d bytes at offset %zd", RECORD_SIZE, off);
            return -1;
        }
        if (off + len < 0) {
            PyErr_Format(StructError, "offset %zd out of range for %zd-byte buffer", off, len);
            return -1;
        }
        off += len;
    }
    if (len - off < RECORD_SIZE) {
        PyErr_Format(StructError, "pack_into requires a buffer of at least %zd bytes for packing %d bytes at offset "
                     "%zd (actual buffer size is %zd)", off + RECORD_SIZE, RECORD_SIZE, off, len);
        return -1;
    }
    return off;
}

/* The writable buffer pack_into takes: TypeError (struct's) for a read-only one. */
static int writable_view(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) == 0)
        return 0;
    if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "argument must be read-write bytes-like object, not %.100s", Py_TYPE(obj)->tp_name);
    }
    return -1;
}

/* pack_records(a[0] buf, a[1] metas, a[2] segment_id, a[3] offset): the offset past the group */
static PyObject *pack_records_impl(PyObject **a)
{
    /* the record's fields in RECORD order, as positions in a meta tuple (-1: segment_id, -2: the offset) */
    static const int from_meta[9] = {1, -1, -2, 4, 2, 3, 6, 7, 5};
    static const char codes[9] = {'Q', 'I', 'I', 'I', 'H', 'H', 'Q', 'Q', 'Q'};
    static const int at[9] = {0, 8, 12, 16, 20, 22, 24, 32, 40};
    PyObject *metas = PySequence_Fast(a[1], "pack_records: metas must be iterable");
    if (!metas)
        return NULL;
    Py_buffer view = {0};  /* taken at the first record, as pack_into takes it */
    PyObject *offset = Py_NewRef(a[3]), *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta = PySequence_Tuple(PySequence_Fast_GET_ITEM(metas, i));
        if (!meta)
            goto done;
        if (PyTuple_GET_SIZE(meta) != 10) {
            if (PyTuple_GET_SIZE(meta) > 10)
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 10)");
            else
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 10, got %zd)", PyTuple_GET_SIZE(meta));
            Py_DECREF(meta);
            goto done;
        }
        long long seq;
        int ovf;
        int rc = as_ll(PyTuple_GET_ITEM(meta, 0), &seq, &ovf);
        if (rc == 0 && !view.obj)
            rc = writable_view(a[0], &view);
        Py_ssize_t off = rc < 0 ? -1 : record_slot(seq, ovf, view.len);
        rc = off < 0 ? -1 : 0;
        uint8_t *p = rc < 0 ? NULL : (uint8_t *)view.buf + off;
        if (p)
            memset(p, 0, RECORD_SIZE);  /* struct zeroes the record first, then packs field by field */
        for (int f = 0; f < 9 && rc == 0; f++) {
            PyObject *v = from_meta[f] >= 0 ? PyTuple_GET_ITEM(meta, from_meta[f]) : from_meta[f] == -1 ? a[2] : offset;
            rc = pack_field(v, codes[f], p + at[f]);
        }
        if (rc == 0)
            rc = pack_fixed(PyTuple_GET_ITEM(meta, 9), p + 48, 16);
        if (rc == 0) {  /* offset += frame_len */
            PyObject *next = PyNumber_Add(offset, PyTuple_GET_ITEM(meta, 4));
            rc = next ? 0 : -1;
            if (next)
                Py_SETREF(offset, next);
        }
        Py_DECREF(meta);
        if (rc < 0)
            goto done;
    }
    result = Py_NewRef(offset);
done:
    Py_DECREF(offset);
    if (view.obj)
        PyBuffer_Release(&view);
    Py_DECREF(metas);
    return result;
}

static PyObject *py_pack_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "metas", "segment_id", "offset"};
    PyObject *a[4];
    if (bind_args("pack_records", args, nargs, kwnames, names, 4, 4, 4, a) < 0)
        return NULL;
    return pack_records_impl(a);
}

/* index_group(records, metas, segment_id, offset, delta, slots, upsert): _pure.index_group,
 * the records of a published group, then each of its entities' delta slot pointed at the
 * entity's newest event (a slot met for the first time is found through upsert). */
static PyObject *py_index_group(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"records", "metas", "segment_id", "offset", "delta", "slots", "upsert"};
    PyObject *a[7];
    if (bind_args("index_group", args, nargs, kwnames, names, 7, 7, 7, a) < 0)
        return NULL;
    if (!PyDict_Check(a[5])) {
        PyErr_SetString(PyExc_TypeError, "index_group: slots must be a dict");
        return NULL;
    }
    PyObject *end = pack_records_impl(a);  /* every record first: a reader that sees a slot finds its record */
    if (!end)
        return NULL;
    PyObject *metas = PySequence_Fast(a[1], "index_group: metas must be iterable");
    if (!metas) {
        Py_DECREF(end);
        return NULL;
    }
    Py_buffer view;
    if (writable_view(a[4], &view) < 0) {
        Py_DECREF(metas);
        Py_DECREF(end);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    for (Py_ssize_t i = 0; i < n && end; i++) {
        PyObject *meta = PySequence_Tuple(PySequence_Fast_GET_ITEM(metas, i));  /* of 10: pack_records took it */
        if (!meta) {
            Py_CLEAR(end);
            break;
        }
        PyObject *entity = PyTuple_GET_ITEM(meta, 8), *seq = PyTuple_GET_ITEM(meta, 0);
        PyObject *slot = PyDict_GetItemWithError(a[5], entity);
        if (slot)
            Py_INCREF(slot);
        else if (!PyErr_Occurred()) {  /* slots[entity] = upsert(entity_hash, seq, prev_seq) */
            slot = PyObject_CallFunctionObjArgs(a[6], PyTuple_GET_ITEM(meta, 6), seq, PyTuple_GET_ITEM(meta, 5), NULL);
            if (slot && PyDict_SetItem(a[5], entity, slot) < 0)
                Py_CLEAR(slot);
        }
        long long at = -1;
        int ovf = 0;
        unsigned long long value = 0;
        if (!slot || as_ll(slot, &at, &ovf) < 0 || pack_uint(seq, 'Q', ~0ULL, &value) < 0)
            Py_CLEAR(end);
        else if (ovf || at < 0 || at > (long long)view.len - 16) {
            PyErr_Format(StructError, "index_group: delta slot %S outside a table of %zd bytes", slot, view.len);
            Py_CLEAR(end);
        } else  /* each event in turn: the newest of an entity's is what stays */
            st64((uint8_t *)view.buf + at + 8, value);
        Py_XDECREF(slot);
        Py_DECREF(meta);
    }
    PyBuffer_Release(&view);
    Py_DECREF(metas);
    return end;
}

/* ====================================================================================
 * The reader's hot path: an Event built straight from a valid frame (_format.frame's
 * event_from_header after frame_header), one at a time (event_at) or a run (scan_events).
 * Event is a __slots__ class of _values: its instances are allocated by its type and
 * their slots filled at the offsets its member descriptors name (what Event.__init__
 * assigns, without running Python); Coordinate and Kind objects are built by their own
 * Python constructors on a cache miss and reused after.
 * ==================================================================================== */
enum { EV_PAYLOAD_CACHE, EV_CAUSATION, EV_COORD, EV_CORRELATION, EV_CLOCK, EV_HASH, EV_ID, EV_SEQ, EV_KIND,
       EV_PAYLOAD, EV_PV, EV_PREV, EV_WALL, EV_REDACTED, EV_SCOPE_POS, EV_SLOTS };
static const char *const EV_NAMES[EV_SLOTS] = {
    "_payload", "causation_id", "coordinate", "correlation_id", "entity_clock", "event_hash", "event_id",
    "global_sequence", "kind", "payload_bytes", "payload_version", "prev_hash", "wall_ms", "redacted",
    "scope_position",
};
static PyTypeObject *EventType;     /* batpak_mp._values.Event */
static Py_ssize_t ev_offset[EV_SLOTS];
static PyObject *Undecoded;         /* batpak_mp._values._UNDECODED: the payload is not decoded yet */
static PyObject *CoordTrusted;      /* batpak_mp._values.Coordinate._trusted */
static PyObject *KindUnpack;        /* batpak_mp._values.Kind.unpack */
static PyObject *KindCache;         /* batpak_mp._format.frame._KINDS: packed kind -> Kind, shared with Python */
static Py_ssize_t CoordCacheMax;    /* batpak_mp._format.frame.COORD_CACHE_MAX */

static int load_event_types(void)
{
    if (EventType)
        return 0;
    PyObject *type = import_attr("batpak_mp._values", "Event");
    PyObject *coord = type ? import_attr("batpak_mp._values", "Coordinate") : NULL;
    PyObject *kind = coord ? import_attr("batpak_mp._values", "Kind") : NULL;
    PyObject *undecoded = kind ? import_attr("batpak_mp._values", "_UNDECODED") : NULL;
    PyObject *kinds = undecoded ? import_attr("batpak_mp._format.frame", "_KINDS") : NULL;
    PyObject *cmax = kinds ? import_attr("batpak_mp._format.frame", "COORD_CACHE_MAX") : NULL;
    PyObject *trusted = cmax ? PyObject_GetAttrString(coord, "_trusted") : NULL;
    PyObject *unpack = trusted ? PyObject_GetAttrString(kind, "unpack") : NULL;
    Py_ssize_t offsets[EV_SLOTS], max = -1;
    int ok = unpack != NULL;
    if (ok && (!PyType_Check(type) || !PyDict_Check(kinds) || (max = PyLong_AsSsize_t(cmax)) < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ImportError, "Event must be a class and _KINDS a dict");
        ok = 0;
    }
    PyTypeObject *tp = ok ? (PyTypeObject *)type : NULL;
    /* every slot a plain object slot (T_OBJECT_EX), and no other field: the layout this code fills */
    if (ok) {
        Py_ssize_t members = 0;
        for (PyMemberDef *m = tp->tp_members; m && m->name; m++)
            members++;
        ok = members == EV_SLOTS && tp->tp_dictoffset == 0 && tp->tp_base == &PyBaseObject_Type;
        for (int i = 0; ok && i < EV_SLOTS; i++) {
            PyObject *d = PyDict_GetItemString(tp->tp_dict, EV_NAMES[i]);
            ok = d && Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
            if (ok)
                offsets[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        }
        if (!ok)
            PyErr_SetString(PyExc_ImportError, "batpak_mp._values.Event is not the __slots__ class this codec fills");
    }
    Py_XDECREF(coord);
    Py_XDECREF(kind);
    Py_XDECREF(cmax);
    if (!ok) {
        Py_XDECREF(type);
        Py_XDECREF(undecoded);
        Py_XDECREF(kinds);
        Py_XDECREF(trusted);
        Py_XDECREF(unpack);
        return -1;
    }
    memcpy(ev_offset, offsets, sizeof offsets);
    Undecoded = undecoded;
    KindCache = kinds;
    CoordTrusted = trusted;
    KindUnpack = unpack;
    CoordCacheMax = max;
    EventType = tp;  /* last: it says all of the above is set */
    return 0;
}

/* The Coordinate of a frame's names through the reader's cache (new reference); NULL with
 * no exception set when the names are not UTF-8 (event_from_header's None). */
static PyObject *coordinate_of(const uint8_t *names, const header_t *h, PyObject *coords)
{
    PyObject *key = bytes_at(names, (size_t)h->elen + h->slen);
    if (!key)
        return NULL;
    PyObject *hit = PyDict_GetItemWithError(coords, key), *coord = NULL;
    if (hit && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2 && PyLong_Check(PyTuple_GET_ITEM(hit, 0))
        && PyLong_AsLong(PyTuple_GET_ITEM(hit, 0)) == (long)h->elen) {
        coord = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
        Py_DECREF(key);
        return coord;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *entity = bytes_at(names, h->elen);
    PyObject *scope = entity ? bytes_at(names + h->elen, h->slen) : NULL;
    if (scope)
        coord = PyObject_CallFunctionObjArgs(CoordTrusted, entity, scope, NULL);
    Py_XDECREF(entity);
    Py_XDECREF(scope);
    if (!coord) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
        Py_DECREF(key);
        return NULL;
    }
    PyObject *entry = Py_BuildValue("(iO)", (int)h->elen, coord);
    int rc = entry ? 0 : -1;
    if (rc == 0 && PyDict_GET_SIZE(coords) >= CoordCacheMax)
        PyDict_Clear(coords);
    if (rc == 0)
        rc = PyDict_SetItem(coords, key, entry);
    Py_XDECREF(entry);
    Py_DECREF(key);
    if (rc < 0)
        Py_CLEAR(coord);
    return coord;
}

/* The Kind of a packed kind: from _format.frame._KINDS (shared with the Python readers),
 * remembered here too, by value, so the hot path allocates no int to look it up. */
static PyObject *kind_seen[1 << 16];

static PyObject *kind_of(unsigned kind)
{
    PyObject *k = kind_seen[kind & 0xFFFF];
    if (k)
        return Py_NewRef(k);
    PyObject *key = PyLong_FromUnsignedLong(kind);
    if (!key)
        return NULL;
    k = PyDict_GetItemWithError(KindCache, key);
    if (k)
        Py_INCREF(k);
    else if (!PyErr_Occurred() && (k = PyObject_CallOneArg(KindUnpack, key)) != NULL && PyDict_SetItem(KindCache, key, k) < 0)
        Py_CLEAR(k);
    Py_DECREF(key);
    if (k)
        kind_seen[kind & 0xFFFF] = Py_NewRef(k);  /* kept for good: at most 65,536 small tuples */
    return k;
}

/* The Event of the valid frame at p whose header is h (event_from_header): a new
 * reference, Py_None (new) when the names are not UTF-8, NULL on error. */
static PyObject *event_object(const uint8_t *p, const header_t *h, PyObject *coords)
{
    PyObject *coord = coordinate_of(p + HEADER_SIZE, h, coords);
    if (!coord)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    PyObject *v[EV_SLOTS];
    v[EV_COORD] = coord;
    int redacted = (h->flags & FLAG_REDACTED) != 0;  /* a stub: no payload (None), flagged */
    v[EV_PAYLOAD_CACHE] = Py_NewRef(redacted ? Py_None : Undecoded);
    v[EV_REDACTED] = Py_NewRef(redacted ? Py_True : Py_False);
    v[EV_SCOPE_POS] = Py_NewRef(Py_None);  /* filled by the reader from positions.idx */
    v[EV_KIND] = kind_of(h->kind);
    v[EV_ID] = bytes_at(p + 48, 16);
    v[EV_SEQ] = PyLong_FromUnsignedLongLong(h->seq);
    v[EV_CLOCK] = PyLong_FromUnsignedLongLong(h->clock);
    v[EV_WALL] = PyLong_FromUnsignedLongLong(h->wall);
    v[EV_PAYLOAD] = bytes_at(p + HEADER_SIZE + h->elen + h->slen, redacted ? 0 : h->plen);
    v[EV_PV] = PyLong_FromLong(h->pv);
    v[EV_HASH] = bytes_at(p + HASH_OFFSET, 32);
    v[EV_PREV] = bytes_at(p + 112, 32);
    v[EV_CAUSATION] = h->flags & FLAG_HAS_CAUSATION ? bytes_at(p + 64, 16) : Py_NewRef(Py_None);
    v[EV_CORRELATION] = h->flags & FLAG_HAS_CORRELATION ? bytes_at(p + 80, 16) : Py_NewRef(Py_None);
    PyObject *ev = NULL;
    int complete = 1;
    for (int i = 0; i < EV_SLOTS; i++)
        complete &= v[i] != NULL;
    if (complete)
        ev = EventType->tp_alloc(EventType, 0);
    if (!ev) {
        for (int i = 0; i < EV_SLOTS; i++)
            Py_XDECREF(v[i]);
        return NULL;
    }
    for (int i = 0; i < EV_SLOTS; i++)  /* the slots take the references */
        *(PyObject **)((char *)ev + ev_offset[i]) = v[i];
    /* An Event holds bytes, ints, None, its Coordinate and Kind, and later its decoded
     * payload: it can be part of no reference cycle, so the cycle collector need not
     * walk the millions a scan makes (CPython untracks such tuples and dicts likewise). */
    PyObject_GC_UnTrack(ev);
    return ev;
}

/* event_at(buf, off, limit, seq, coords) -> Event | None: _pure.event_at */
static PyObject *py_event_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "limit", "seq", "coords"};
    PyObject *a[5];
    if (bind_args("event_at", args, nargs, kwnames, names, 5, 5, 5, a) < 0)
        return NULL;
    if (!PyDict_Check(a[4])) {
        PyErr_SetString(PyExc_TypeError, "event_at: coords must be a dict");
        return NULL;
    }
    if (load_event_types() < 0)
        return NULL;
    long long off, limit;
    int ovf_off, ovf_limit;
    if (as_ll(a[1], &off, &ovf_off) < 0 || as_ll(a[2], &limit, &ovf_limit) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = NULL;
    header_t h;
    int why;
    uint32_t need;
    if (off < 0 || limit > view.len || off > limit
        || header_at(view_bytes(&view), view.len, off, limit, 0, &h, &why, &need) != HV_VALID
        || h.frame_len != (unsigned long long)(limit - off)) {
        r = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *frame_seq = PyLong_FromUnsignedLongLong(h.seq);
    int differs = frame_seq ? PyObject_RichCompareBool(frame_seq, a[3], Py_NE) : -1;
    Py_XDECREF(frame_seq);
    if (differs < 0)
        goto done;
    r = differs ? Py_NewRef(Py_None) : event_object(view_bytes(&view) + off, &h, a[4]);
done:
    PyBuffer_Release(&view);
    return r;
}

/* A sequence number argument as a u64: 1 and *out when it is an int in [0, 2**64), 0 when
 * it is an int outside (no frame carries it), -1 with TypeError when it is not an int. */
static int as_u64(PyObject *o, unsigned long long *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* scan_events(buf, off, limit, seq, last, coords, max_events) -> (events, off, seq):
 * _pure.scan_events, a run of frames front to back as Events. Stops before a frame that
 * is not valid, does not carry the next sequence, is written in a fence (the caller
 * decides whether it is hidden) or whose names are not UTF-8; after `last`; after
 * max_events. */
static PyObject *py_scan_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"buf", "off", "limit", "seq", "last", "coords", "max_events"};
    PyObject *a[7];
    if (bind_args("scan_events", args, nargs, kwnames, names, 7, 7, 7, a) < 0)
        return NULL;
    if (!PyDict_Check(a[5])) {
        PyErr_SetString(PyExc_TypeError, "scan_events: coords must be a dict");
        return NULL;
    }
    if (load_event_types() < 0)
        return NULL;
    long long off, limit, max_events;
    int ovf_off, ovf_limit, ovf_max;
    unsigned long long seq = 0, last = 0;
    if (as_ll(a[1], &off, &ovf_off) < 0 || as_ll(a[2], &limit, &ovf_limit) < 0 || as_ll(a[6], &max_events, &ovf_max) < 0)
        return NULL;
    int seq_ok = as_u64(a[3], &seq);
    if (seq_ok < 0)
        return NULL;
    if (!PyLong_Check(a[4])) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(a[4])->tp_name);
        return NULL;
    }
    int last_sign = _PyLong_Sign(a[4]);
    int last_ok = as_u64(a[4], &last);
    if (last_ok < 0)
        return NULL;
    if (!last_ok)  /* an int outside the u64 range: past every sequence, or below all of them */
        last = last_sign > 0 ? ~0ULL : 0;
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *events = NULL, *result = NULL;
    if (off < 0 || limit > view.len) {
        PyErr_Format(PyExc_ValueError, "scan_events: offset %S or limit %S outside buffer of %zd bytes", a[1], a[2],
                     view.len);
        goto done;
    }
    events = PyList_New(0);
    if (!events)
        goto done;
    const uint8_t *base = view_bytes(&view);
    long long at = off;
    Py_ssize_t count = 0;
    /* seq <= last, with a negative last below every sequence */
    int more = seq_ok && (last_ok || last_sign > 0) && seq <= last;
    long long cap = ovf_max > 0 ? LLONG_MAX : ovf_max < 0 ? 0 : max_events;
    while (more && count < cap) {
        header_t h;
        int why;
        uint32_t need;
        if (at > limit || header_at(base, view.len, at, limit, 0, &h, &why, &need) != HV_VALID || h.seq != seq
            || (h.flags & FLAG_FENCED))
            break;
        PyObject *ev = event_object(base + at, &h, a[5]);
        if (!ev)
            goto done;
        if (ev == Py_None) {
            Py_DECREF(ev);
            break;
        }
        int rc = PyList_Append(events, ev);
        Py_DECREF(ev);
        if (rc < 0)
            goto done;
        count++;
        at += h.frame_len;
        more = seq != last;  /* (seq == 2**64 - 1 ends every run: the next can be no frame's) */
        seq++;
    }
    PyObject *n = PyLong_FromSsize_t(count);
    PyObject *next_seq = n ? PyNumber_Add(a[3], n) : NULL;
    Py_XDECREF(n);
    if (next_seq)
        result = Py_BuildValue("(OLN)", events, at, next_seq);
done:
    Py_XDECREF(events);
    PyBuffer_Release(&view);
    return result;
}

/* ====================================================================================
 * encode_request: _pure.encode_request, one append request planned and encoded (the
 * commit path's per-event work): entity states, the expected-clock guard, flags, event
 * ids, the frames (as encode_group writes them), index metas, receipts, new states.
 * ==================================================================================== */
static PyObject *ConcurrencyConflictType;  /* batpak_mp._errors.ConcurrencyConflict */
static PyObject *ZeroId;                   /* batpak_mp._format.frame.ZERO_ID */

static int load_plan_types(void)
{
    if (ZeroId)
        return 0;
    PyObject *conflict = import_attr("batpak_mp._errors", "ConcurrencyConflict");
    PyObject *zero = conflict ? import_attr("batpak_mp._format.frame", "ZERO_ID") : NULL;
    if (!zero) {
        Py_XDECREF(conflict);
        return -1;
    }
    ConcurrencyConflictType = conflict;
    ZeroId = zero;
    return 0;
}

/* x != ZERO_ID, without a call for the usual bytes */
static int not_zero_id(PyObject *x)
{
    if (PyBytes_CheckExact(x) && PyBytes_GET_SIZE(x) == 16) {
        static const uint8_t zeros[16];
        return memcmp(PyBytes_AS_STRING(x), zeros, 16) != 0;
    }
    return PyObject_RichCompareBool(x, ZeroId, Py_NE);
}

/* tuple.__new__(type, items) from n new references (stolen, NULLs allowed on error):
 * a NamedTuple's own __new__ builds its instances exactly so, without the Python call. */
static PyObject *named_of(PyObject *type, PyObject **items, Py_ssize_t n)
{
    PyObject *r = NULL;
    int complete = 1;
    for (Py_ssize_t i = 0; i < n; i++)
        complete &= items[i] != NULL;
    if (complete && !(PyType_Check(type) && PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)))
        PyErr_Format(PyExc_TypeError, "tuple.__new__(X): X is not a subtype of tuple");
    else if (complete) {
        r = type == (PyObject *)&PyTuple_Type ? PyTuple_New(n) : ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, n);
        if (r) {
            int atomic = 1;
            for (Py_ssize_t i = 0; i < n; i++) {
                PyTuple_SET_ITEM(r, i, items[i]);
                atomic &= !PyObject_IS_GC(items[i]);
            }
            /* of bytes, str, ints and None only: in no reference cycle, so out of the cycle
             * collector's way at once (CPython untracks such tuples at its next collection) */
            if (atomic)
                PyObject_GC_UnTrack(r);
            return r;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return r;
}

static PyObject *item_of(PyObject *seq, Py_ssize_t i)
{
    if (PyTuple_Check(seq) && i < PyTuple_GET_SIZE(seq))
        return Py_NewRef(PyTuple_GET_ITEM(seq, i));
    return PySequence_GetItem(seq, i);
}

/* bytes.decode() */
static PyObject *decoded(PyObject *raw)
{
    if (PyBytes_Check(raw))
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), NULL);
    return PyObject_CallMethod(raw, "decode", NULL);
}

typedef struct {
    PyObject *item;  /* the Prepared (a tuple of at least 9 fields) */
    PyObject *st;    /* the chain state the event builds on */
    PyObject *head;  /* st[1]: the previous event's hash, or the index of a request event */
    PyObject *flags, *seq, *clock, *event_id;
} planned_t;

static void planned_release(planned_t *e)
{
    Py_XDECREF(e->item);
    Py_XDECREF(e->st);
    Py_XDECREF(e->head);
    Py_XDECREF(e->flags);
    Py_XDECREF(e->seq);
    Py_XDECREF(e->clock);
    Py_XDECREF(e->event_id);
}

/* The first pass of one event: its chain state (mine, entities, known, lookup), the
 * expected-clock guard, flags, sequence, clock and event id. 0, or -1 raised. */
static int plan_event(planned_t *e, PyObject *entity, Py_ssize_t i, int last, long long fence, PyObject **a,
                      PyObject *mine, PyObject *first_seq)
{
    PyObject *dicts[3] = {mine, a[1], a[2]}, *st = NULL;
    for (int d = 0; d < 3; d++) {  /* mine.get(entity) or entities.get(entity) or known.get(entity) */
        PyObject *got = PyDict_GetItemWithError(dicts[d], entity);
        if (!got && PyErr_Occurred())
            return -1;
        if (d == 2 || !got) {
            st = got;
            if (d < 2)
                continue;
            break;
        }
        int truth = PyObject_IsTrue(got);
        if (truth < 0)
            return -1;
        if (truth) {
            st = got;
            break;
        }
        st = got;
    }
    if (st)
        Py_INCREF(st);
    else {  /* known[entity] = lookup(entity) */
        st = PyObject_CallOneArg(a[3], entity);
        if (!st || PyDict_SetItem(a[2], entity, st) < 0) {
            Py_XDECREF(st);
            return -1;
        }
    }
    e->st = st;
    PyObject *clock0 = item_of(st, 0);
    if (!clock0)
        return -1;
    PyObject *expected = item_of(e->item, 6);
    int differs = !expected ? -1 : expected == Py_None ? 0 : PyObject_RichCompareBool(expected, clock0, Py_NE);
    if (differs > 0) {  /* ConcurrencyConflict(entity.decode(), expected, st[0]) */
        PyObject *name = decoded(entity);
        PyObject *exc = name ? PyObject_CallFunctionObjArgs(ConcurrencyConflictType, name, expected, clock0, NULL) : NULL;
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        Py_XDECREF(name);
        differs = -1;
    }
    Py_XDECREF(expected);
    if (differs < 0) {
        Py_DECREF(clock0);
        return -1;
    }
    long long flags = (last ? FLAG_COMMIT_END : 0) | fence;  /* last: the request's last event */
    for (int k = 0; k < 2; k++) {
        PyObject *id = item_of(e->item, 7 + k);
        int set = id ? not_zero_id(id) : -1;
        Py_XDECREF(id);
        if (set < 0) {
            Py_DECREF(clock0);
            return -1;
        }
        if (set)
            flags |= k ? FLAG_HAS_CORRELATION : FLAG_HAS_CAUSATION;
    }
    e->flags = PyLong_FromLongLong(flags);
    e->clock = PyNumber_Add(clock0, ONE);
    Py_DECREF(clock0);
    PyObject *idx = PyLong_FromSsize_t(i);
    e->seq = idx ? PyNumber_Add(first_seq, idx) : NULL;
    Py_XDECREF(idx);
    e->head = item_of(st, 1);
    if (!e->flags || !e->clock || !e->seq || !e->head)
        return -1;
    unsigned long long seq = PyLong_AsUnsignedLongLong(e->seq);  /* seq.to_bytes(8, "big"): OverflowError */
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    Py_ssize_t plen = PyBytes_GET_SIZE(a[6]);
    e->event_id = PyBytes_FromStringAndSize(NULL, plen + 8);
    if (!e->event_id)
        return -1;
    uint8_t *id = (uint8_t *)PyBytes_AS_STRING(e->event_id);
    memcpy(id, PyBytes_AS_STRING(a[6]), (size_t)plen);
    for (int b = 0; b < 8; b++)
        id[plen + b] = (uint8_t)(seq >> (56 - 8 * b));
    /* mine[entity] = (clock, i, seq, st[3]) */
    PyObject *hash = item_of(st, 3);
    PyObject *index = hash ? PyLong_FromSsize_t(i) : NULL;
    PyObject *moved = index ? PyTuple_Pack(4, e->clock, index, e->seq, hash) : NULL;
    int rc = moved ? PyDict_SetItem(mine, entity, moved) : -1;
    Py_XDECREF(hash);
    Py_XDECREF(index);
    Py_XDECREF(moved);
    return rc;
}

/* The third pass of one event: its index meta, receipt and new state. */
static int finish_event(const planned_t *e, PyObject **a, const uint8_t *hashes, Py_ssize_t n, uint32_t frame_len,
                        Py_ssize_t i, PyObject **meta, PyObject **receipt, PyObject **state)
{
    *meta = *receipt = *state = NULL;
    PyObject *entity = item_of(e->item, 0), *scope = item_of(e->item, 1), *ehash = bytes_at(hashes + 32 * i, 32);
    PyObject *prev = NULL, *scope_hash = NULL, *name_h = item_of(e->st, 3);
    if (!entity || !scope || !ehash || !name_h)
        goto fail;
    if (PyLong_Check(e->head)) {  /* an earlier event of this request: encode_group took its hash */
        Py_ssize_t h = PyLong_AsSsize_t(e->head);
        if (h < 0 || h >= n) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_IndexError, "list index out of range");
            goto fail;
        }
        prev = bytes_at(hashes + 32 * h, 32);
    } else
        prev = Py_NewRef(e->head);
    scope_hash = PyDict_GetItemWithError(a[9], scope);
    if (scope_hash)
        Py_INCREF(scope_hash);
    else if (!PyErr_Occurred()) {
        scope_hash = py_name_hash(NULL, scope);
        if (scope_hash && PyDict_SetItem(a[9], scope, scope_hash) < 0)
            Py_CLEAR(scope_hash);
    }
    if (!prev || !scope_hash)
        goto fail;
    PyObject *m[10] = {Py_NewRef(e->seq), Py_NewRef(e->clock), item_of(e->item, 2), Py_NewRef(e->flags),
                       PyLong_FromUnsignedLong(frame_len), item_of(e->st, 2), Py_NewRef(name_h),
                       Py_NewRef(scope_hash), Py_NewRef(entity), item_of(e->item, 5)};
    PyObject *r[11] = {Py_NewRef(e->event_id), Py_NewRef(e->seq), decoded(entity), decoded(scope), Py_NewRef(e->clock),
                       Py_NewRef(ehash), Py_NewRef(prev), Py_NewRef(a[5]), Py_NewRef(a[8]), Py_NewRef(Py_None),
                       Py_NewRef(Py_False)};  /* Receipt: ..., signature, deduplicated */
    PyObject *s[4] = {Py_NewRef(e->clock), Py_NewRef(ehash), Py_NewRef(e->seq), Py_NewRef(name_h)};
    *meta = named_of((PyObject *)&PyTuple_Type, m, 10);  /* each steals its items, also on failure */
    *receipt = named_of(a[10], r, 11);
    *state = named_of(a[11], s, 4);
    if (!*meta || !*receipt || !*state) {
        Py_CLEAR(*meta);
        Py_CLEAR(*receipt);
        Py_CLEAR(*state);
    }
fail:
    Py_XDECREF(entity);
    Py_XDECREF(scope);
    Py_XDECREF(ehash);
    Py_XDECREF(prev);
    Py_XDECREF(scope_hash);
    Py_XDECREF(name_h);
    return *state ? 0 : -1;
}

static PyObject *py_encode_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"items", "entities", "known", "lookup", "first_seq", "wall_ms", "id_prefix",
                                        "fence_flag", "durable", "scope_hashes", "receipt_type", "state_type"};
    PyObject *a[12];
    if (bind_args("encode_request", args, nargs, kwnames, names, 12, 12, 12, a) < 0)
        return NULL;
    if (!PyDict_Check(a[1]) || !PyDict_Check(a[2]) || !PyDict_Check(a[9]) || !PyBytes_Check(a[6])) {
        PyErr_SetString(PyExc_TypeError, "encode_request: entities, known and scope_hashes must be dicts, id_prefix bytes");
        return NULL;
    }
    long long fence;
    int ovf;
    if (load_plan_types() < 0 || as_ll(a[7], &fence, &ovf) < 0)
        return NULL;
    if (ovf || fence < 0 || fence > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "encode_request: fence_flag must be a flag word");
        return NULL;
    }
    PyObject *items = PySequence_Fast(a[0], "encode_request: items must be a sequence");
    if (!items)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items), filled = 0;
    planned_t *evs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(planned_t));
    event_t *frames = PyMem_Malloc(n ? (size_t)n * sizeof(event_t) : 1);  /* each filled before use */
    uint8_t *hashes = PyMem_Malloc(n ? 32 * (size_t)n : 1);
    PyObject *mine = PyDict_New(), *data = NULL, *metas = NULL, *receipts = NULL, *keyed = NULL, *states = NULL;
    PyObject *result = NULL;
    if (!evs || !frames || !hashes || !mine) {
        PyErr_NoMemory();
        goto done;
    }
    /* first pass: states, the guard, flags, ids (encode_request's first loop) */
    for (Py_ssize_t i = 0; i < n; i++) {
        planned_t *e = &evs[i];
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        e->item = PyTuple_Check(item) ? Py_NewRef(item) : PySequence_Tuple(item);  /* a Prepared is a tuple */
        if (!e->item)
            goto done;
        if (PyTuple_GET_SIZE(e->item) < 9) {
            PyErr_SetString(PyExc_IndexError, "tuple index out of range");
            goto done;
        }
        if (plan_event(e, PyTuple_GET_ITEM(e->item, 0), i, i == n - 1, fence, a, mine, a[4]) < 0)
            goto done;
    }
    /* second pass: the frames, as encode_group encodes its rows */
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        planned_t *e = &evs[i];
        PyObject *t = e->item;
        PyObject *row[14] = {e->flags, PyTuple_GET_ITEM(t, 2), PyTuple_GET_ITEM(t, 4), e->seq, e->clock, a[5],
                             e->event_id, PyTuple_GET_ITEM(t, 7), PyTuple_GET_ITEM(t, 8), PyTuple_GET_ITEM(t, 5),
                             e->head, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 3)};
        memset(frames[i].part, 0, sizeof frames[i].part);  /* event_fill releases what it took on failure */
        if (event_fill(&frames[i], row, 1, i) < 0)
            goto done;
        filled = i + 1;
        total += frames[i].frame_len;
        if (total > (size_t)PY_SSIZE_T_MAX) {
            PyErr_SetString(PyExc_OverflowError, "encode_request: the request is larger than a bytes object can be");
            goto done;
        }
    }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!data)
        goto done;
    if (total >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        write_group(frames, n, (uint8_t *)PyBytes_AS_STRING(data), hashes);
        Py_END_ALLOW_THREADS
    } else
        write_group(frames, n, (uint8_t *)PyBytes_AS_STRING(data), hashes);
    /* third pass: metas, receipts, new states, keys */
    metas = PyList_New(n);
    receipts = metas ? PyList_New(n) : NULL;
    states = receipts ? PyList_New(n) : NULL;
    keyed = states ? PyList_New(0) : NULL;
    if (!keyed)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *meta, *receipt, *state;
        if (finish_event(&evs[i], a, hashes, n, frames[i].frame_len, i, &meta, &receipt, &state) < 0)
            goto done;
        PyList_SET_ITEM(metas, i, meta);
        PyList_SET_ITEM(receipts, i, receipt);
        PyList_SET_ITEM(states, i, state);
        PyObject *idem = PyTuple_GET_ITEM(evs[i].item, 5);
        int keyed_event = not_zero_id(idem);
        PyObject *pair = keyed_event > 0 ? PyTuple_Pack(2, idem, evs[i].seq) : NULL;
        if (keyed_event < 0 || (keyed_event && (!pair || PyList_Append(keyed, pair) < 0))) {
            Py_XDECREF(pair);
            goto done;
        }
        Py_XDECREF(pair);
    }
    for (Py_ssize_t i = 0; i < n; i++)  /* only now: nothing can fail any more */
        if (PyDict_SetItem(a[1], PyTuple_GET_ITEM(evs[i].item, 0), PyList_GET_ITEM(states, i)) < 0)
            goto done;
    result = PyTuple_Pack(4, data, metas, receipts, keyed);
done:
    if (evs)
        for (Py_ssize_t i = 0; i < n; i++)
            planned_release(&evs[i]);
    if (frames)
        for (Py_ssize_t i = 0; i < filled; i++)
            event_release(&frames[i]);
    PyMem_Free(evs);
    PyMem_Free(frames);
    PyMem_Free(hashes);
    Py_XDECREF(mine);
    Py_XDECREF(data);
    Py_XDECREF(metas);
    Py_XDECREF(receipts);
    Py_XDECREF(states);
    Py_XDECREF(keyed);
    Py_DECREF(items);
    return result;
}

/* ==================================================================================== */
#define FASTKW(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef codec_methods[] = {
    FASTKW("crc32", py_crc32, "crc32(data, value=0) -> int: zlib.crc32, IEEE CRC-32 continuing from value."),
    FASTKW("blake2b", py_blake2b,
           "blake2b(data, digest_size=64, person=b'') -> bytes: hashlib.blake2b(...).digest(), key-less."),
    {"name_hash", py_name_hash, METH_O, "name_hash(raw) -> int: _format.directory.name_hash."},
    {"idem_hash", py_idem_hash, METH_O, "idem_hash(key) -> bytes: _format.directory.idem_hash."},
    FASTKW("encode_parts", py_encode_parts, "encode_parts(...) -> (pieces, event_hash, frame_len): _format.frame.encode_parts."),
    {"encode_group", py_encode_group, METH_O,
     "encode_group(items) -> (frames, event_hashes, frame_lens): a commit group in one call; an item's\n"
     "prev_hash may be the int index of an earlier item, whose event hash is then used."},
    FASTKW("frame_header", py_frame_header,
           "frame_header(buf, off, limit, *, final=False) -> tuple | int | str: _format.frame.frame_header."),
    FASTKW("scan_frame", py_scan_frame,
           "scan_frame(buf, off, limit, *, final=False) -> (status, value): _format.frame.scan_frame."),
    FASTKW("frame_hash", py_frame_hash, "frame_hash(buf, off, frame_len) -> bytes: _format.frame.frame_hash."),
    FASTKW("hash_matches", py_hash_matches, "hash_matches(buf, off, frame) -> bool: _format.frame.hash_matches."),
    FASTKW("scan_segment", py_scan_segment,
           "scan_segment(buf, start, limit, expect_seq, *, check_hash=False) -> SegmentScan: _format.scan.scan_segment."),
    FASTKW("unpack_record", py_unpack_record,
           "unpack_record(buf, seq) -> tuple: RECORD.unpack_from(buf, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)."),
    FASTKW("encode_request", py_encode_request,
           "encode_request(items, entities, known, lookup, first_seq, wall_ms, id_prefix, fence_flag, durable,\n"
           "scope_hashes, receipt_type, state_type) -> (frames, metas, receipts, keyed): _native._pure.encode_request."),
    FASTKW("index_group", py_index_group,
           "index_group(records, metas, segment_id, offset, delta, slots, upsert) -> int: _native._pure.index_group."),
    FASTKW("pack_records", py_pack_records,
           "pack_records(buf, metas, segment_id, offset) -> int: _native._pure.pack_records, a group's records."),
    FASTKW("event_at", py_event_at,
           "event_at(buf, off, limit, seq, coords) -> Event | None: _native._pure.event_at, the reader's get."),
    FASTKW("scan_events", py_scan_events,
           "scan_events(buf, off, limit, seq, last, coords, max_events) -> (events, off, seq): _native._pure.scan_events."),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, "_codec",
    "The compiled mirror of batpak_mp._format's frame, scan, name-hash and record codecs.", -1, codec_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__codec(void)
{
    crc_init();
    PyObject *m = PyModule_Create(&codec_module);
    if (!m)
        return NULL;
    if (!StructError) {
        StructError = import_attr("struct", "error");
        ONE = PyLong_FromLong(1);
        if (!StructError || !ONE) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "FRAME_VERSION", FRAME_VERSION) < 0 || PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0
        || PyModule_AddIntConstant(m, "MIN_FRAME", MIN_FRAME) < 0 || PyModule_AddIntConstant(m, "KNOWN_FLAGS", KNOWN_FLAGS) < 0
        || PyModule_AddObject(m, "MAX_FRAME", PyLong_FromUnsignedLongLong(MAX_FRAME)) < 0
        || PyModule_AddIntConstant(m, "RECORD_SIZE", RECORD_SIZE) < 0
        || PyModule_AddIntConstant(m, "RECORDS_HEADER_SIZE", RECORDS_HEADER_SIZE) < 0
        || PyModule_AddStringConstant(m, "SOURCE_SHA256", BATPAK_MP_CODEC_SHA256) < 0
        || PyModule_AddObjectRef(m, "CRC32_SIMD", crc_simd ? Py_True : Py_False) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
