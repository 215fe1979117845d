/* _layout.h: the byte layout of a shmctx table, for _speedups.c.
 *
 * generated from _layout.py; do not edit. Regenerate with tools/gen_layout.py
 * (or python -m shmctx._layout --c-header); tests/test_layout.py fails while
 * this file is stale. What each field means is written next to its declaration
 * in _layout.py. */
#ifndef SHMCTX_LAYOUT_H
#define SHMCTX_LAYOUT_H

#define SHMCTX_LAYOUT_VERSION                    4
/* BLAKE2b-64 of the declarations; every table stores the one of its creator at
 * SHMCTX_HEADER_FINGERPRINT_OFF. */
#define SHMCTX_LAYOUT_FINGERPRINT                0x4df7cc5e91b59aa9ULL

/* Header (256 bytes) */
#define SHMCTX_HEADER_SIZE                       256
#define SHMCTX_HEADER_MAGIC_OFF                  0       /* bytes[8] */
#define SHMCTX_HEADER_MAGIC_SIZE                 8
#define SHMCTX_HEADER_VERSION_OFF                8       /* u32 */
#define SHMCTX_HEADER_VERSION_SIZE               4
#define SHMCTX_HEADER_HEADER_SIZE_OFF            12      /* u32 */
#define SHMCTX_HEADER_HEADER_SIZE_SIZE           4
#define SHMCTX_HEADER_SLOT_SIZE_OFF              16      /* u32 */
#define SHMCTX_HEADER_SLOT_SIZE_SIZE             4
#define SHMCTX_HEADER_CAPACITY_OFF               20      /* u32 */
#define SHMCTX_HEADER_CAPACITY_SIZE              4
#define SHMCTX_HEADER_STRIPES_OFF                24      /* u32 */
#define SHMCTX_HEADER_STRIPES_SIZE               4
#define SHMCTX_HEADER_MAX_PROCESSES_OFF          28      /* u32 */
#define SHMCTX_HEADER_MAX_PROCESSES_SIZE         4
#define SHMCTX_HEADER_TOTAL_SIZE_OFF             32      /* u64 */
#define SHMCTX_HEADER_TOTAL_SIZE_SIZE            8
#define SHMCTX_HEADER_MAX_REFERENCES_OFF         40      /* u32 */
#define SHMCTX_HEADER_MAX_REFERENCES_SIZE        4
#define SHMCTX_HEADER_MODE_OFF                   44      /* u32 */
#define SHMCTX_HEADER_MODE_SIZE                  4
#define SHMCTX_HEADER_MAX_IDLE_TIME_OFF          48      /* f64 */
#define SHMCTX_HEADER_MAX_IDLE_TIME_SIZE         8
#define SHMCTX_HEADER_CLEANUP_INTERVAL_OFF       56      /* f64 */
#define SHMCTX_HEADER_CLEANUP_INTERVAL_SIZE      8
#define SHMCTX_HEADER_LOCK_TIMEOUT_OFF           64      /* f64 */
#define SHMCTX_HEADER_LOCK_TIMEOUT_SIZE          8
#define SHMCTX_HEADER_CREATED_OFF                72      /* f64 */
#define SHMCTX_HEADER_CREATED_SIZE               8
#define SHMCTX_HEADER_NEXT_INCARNATION_OFF       80      /* u64 */
#define SHMCTX_HEADER_NEXT_INCARNATION_SIZE      8
#define SHMCTX_HEADER_LIVE_OFF                   88      /* u32 */
#define SHMCTX_HEADER_LIVE_SIZE                  4
#define SHMCTX_HEADER_FREE_HEAD_OFF              92      /* u32 */
#define SHMCTX_HEADER_FREE_HEAD_SIZE             4
#define SHMCTX_HEADER_FLAGS_OFF                  96      /* u32 */
#define SHMCTX_HEADER_FLAGS_SIZE                 4
#define SHMCTX_HEADER_INDEX_SIZE_OFF             100     /* u32 */
#define SHMCTX_HEADER_INDEX_SIZE_SIZE            4
#define SHMCTX_HEADER_TABLE_ID_OFF               104     /* u64 */
#define SHMCTX_HEADER_TABLE_ID_SIZE              8
#define SHMCTX_HEADER_SWEEPER_PID_OFF            112     /* u32 */
#define SHMCTX_HEADER_SWEEPER_PID_SIZE           4
#define SHMCTX_HEADER_SWEEPER_FLAGS_OFF          116     /* u32 */
#define SHMCTX_HEADER_SWEEPER_FLAGS_SIZE         4
#define SHMCTX_HEADER_SWEEPER_START_OFF          120     /* u64 */
#define SHMCTX_HEADER_SWEEPER_START_SIZE         8
#define SHMCTX_HEADER_SWEEPER_BEAT_OFF           128     /* f64 */
#define SHMCTX_HEADER_SWEEPER_BEAT_SIZE          8
#define SHMCTX_HEADER_NAMESPACE_LEN_OFF          136     /* u8 */
#define SHMCTX_HEADER_NAMESPACE_LEN_SIZE         1
#define SHMCTX_HEADER_NAMESPACE_OFF              137     /* bytes[64] */
#define SHMCTX_HEADER_NAMESPACE_SIZE             64
#define SHMCTX_HEADER_FINGERPRINT_OFF            208     /* u64 */
#define SHMCTX_HEADER_FINGERPRINT_SIZE           8

/* Lock record (16 bytes) */
#define SHMCTX_LOCK_SIZE                         16
#define SHMCTX_LOCK_PID_OFF                      0       /* u32 */
#define SHMCTX_LOCK_PID_SIZE                     4
#define SHMCTX_LOCK_EPOCH_OFF                    4       /* u32 */
#define SHMCTX_LOCK_EPOCH_SIZE                   4
#define SHMCTX_LOCK_START_OFF                    8       /* u64 */
#define SHMCTX_LOCK_START_SIZE                   8

/* Name index entry (4 bytes) */
#define SHMCTX_INDEX_ENTRY_SIZE                  4
#define SHMCTX_INDEX_ENTRY_SLOT_OFF              0       /* u32 */
#define SHMCTX_INDEX_ENTRY_SLOT_SIZE             4

/* Process entry (64 bytes) */
#define SHMCTX_PROC_SIZE                         64
#define SHMCTX_PROC_PID_OFF                      0       /* u32 */
#define SHMCTX_PROC_PID_SIZE                     4
#define SHMCTX_PROC_FLAGS_OFF                    4       /* u32 */
#define SHMCTX_PROC_FLAGS_SIZE                   4
#define SHMCTX_PROC_START_OFF                    8       /* u64 */
#define SHMCTX_PROC_START_SIZE                   8
#define SHMCTX_PROC_ATTACHED_OFF                 16      /* f64 */
#define SHMCTX_PROC_ATTACHED_SIZE                8

/* Context slot (256 bytes) */
#define SHMCTX_SLOT_SIZE                         256
#define SHMCTX_SLOT_STATE_OFF                    0       /* u8 */
#define SHMCTX_SLOT_STATE_SIZE                   1
#define SHMCTX_SLOT_FLAGS_OFF                    1       /* u8 */
#define SHMCTX_SLOT_FLAGS_SIZE                   1
#define SHMCTX_SLOT_NAME_LEN_OFF                 2       /* u16 */
#define SHMCTX_SLOT_NAME_LEN_SIZE                2
#define SHMCTX_SLOT_REFCOUNT_OFF                 4       /* u32 */
#define SHMCTX_SLOT_REFCOUNT_SIZE                4
#define SHMCTX_SLOT_INCARNATION_OFF              8       /* u64 */
#define SHMCTX_SLOT_INCARNATION_SIZE             8
#define SHMCTX_SLOT_NAME_HASH_OFF                16      /* u64 */
#define SHMCTX_SLOT_NAME_HASH_SIZE               8
#define SHMCTX_SLOT_SIZE_OFF                     24      /* u64 */
#define SHMCTX_SLOT_SIZE_SIZE                    8
#define SHMCTX_SLOT_PARENT_OFF                   32      /* u32 */
#define SHMCTX_SLOT_PARENT_SIZE                  4
#define SHMCTX_SLOT_NEXT_FREE_OFF                36      /* u32 */
#define SHMCTX_SLOT_NEXT_FREE_SIZE               4
#define SHMCTX_SLOT_PARENT_INC_OFF               40      /* u64 */
#define SHMCTX_SLOT_PARENT_INC_SIZE              8
#define SHMCTX_SLOT_CREATED_OFF                  48      /* f64 */
#define SHMCTX_SLOT_CREATED_SIZE                 8
#define SHMCTX_SLOT_LAST_USED_OFF                56      /* f64 */
#define SHMCTX_SLOT_LAST_USED_SIZE               8
#define SHMCTX_SLOT_CREATOR_PID_OFF              64      /* u32 */
#define SHMCTX_SLOT_CREATOR_PID_SIZE             4
#define SHMCTX_SLOT_CHILDREN_OFF                 68      /* u32 */
#define SHMCTX_SLOT_CHILDREN_SIZE                4
#define SHMCTX_SLOT_CREATOR_START_OFF            72      /* u64 */
#define SHMCTX_SLOT_CREATOR_START_SIZE           8
#define SHMCTX_SLOT_LOCK_PID_OFF                 80      /* u32 */
#define SHMCTX_SLOT_LOCK_PID_SIZE                4
#define SHMCTX_SLOT_LOCK_EPOCH_OFF               84      /* u32 */
#define SHMCTX_SLOT_LOCK_EPOCH_SIZE              4
#define SHMCTX_SLOT_LOCK_START_OFF               88      /* u64 */
#define SHMCTX_SLOT_LOCK_START_SIZE              8
#define SHMCTX_SLOT_NAME_OFF                     96      /* bytes[128] */
#define SHMCTX_SLOT_NAME_SIZE                    128
#define SHMCTX_SLOT_KIND_OFF                     224     /* u8 */
#define SHMCTX_SLOT_KIND_SIZE                    1
#define SHMCTX_SLOT_VERSION_OFF                  228     /* u32 */
#define SHMCTX_SLOT_VERSION_SIZE                 4

/* Reference count (4 bytes) */
#define SHMCTX_REF_SIZE                          4
#define SHMCTX_REF_COUNT_OFF                     0       /* u32 */
#define SHMCTX_REF_COUNT_SIZE                    4

/* Payload header (64 bytes) */
#define SHMCTX_PAYLOAD_SIZE                      64
#define SHMCTX_PAYLOAD_MAGIC_OFF                 0       /* bytes[8] */
#define SHMCTX_PAYLOAD_MAGIC_SIZE                8
#define SHMCTX_PAYLOAD_KIND_OFF                  8       /* u8 */
#define SHMCTX_PAYLOAD_KIND_SIZE                 1
#define SHMCTX_PAYLOAD_META_LEN_OFF              12      /* u32 */
#define SHMCTX_PAYLOAD_META_LEN_SIZE             4
#define SHMCTX_PAYLOAD_DATA_OFF_OFF              16      /* u64 */
#define SHMCTX_PAYLOAD_DATA_OFF_SIZE             8
#define SHMCTX_PAYLOAD_DATA_LEN_OFF              24      /* u64 */
#define SHMCTX_PAYLOAD_DATA_LEN_SIZE             8

/* Regions and the values stored in the table */
#define SHMCTX_LOCKS_OFF                         256     /* lock record k: LOCKS_OFF + LOCK_STRIDE * k */
/* Bytes from one row of reference counts to the next (Geometry.row_stride):
 * process entry p's count for slot s is at refs_off + p * stride + 4 * s. */
#define SHMCTX_REF_ROW_STRIDE(capacity)          ((((Py_ssize_t)(capacity) * 4 + 63) / 64) * 64)
#define SHMCTX_LOCK_STRIDE                       64
#define SHMCTX_REGION_ALIGN                      64
#define SHMCTX_PAGE                              4096
#define SHMCTX_MAX_STRIPES                       64
#define SHMCTX_FREE                              0
#define SHMCTX_CREATING                          1
#define SHMCTX_READY                             2
#define SHMCTX_SLOT_WAITERS                      1
#define SHMCTX_SLOT_LOCK                         2
#define SHMCTX_P_LIVE_LOCK                       1
#define SHMCTX_SLOT_SUPERSEDED                   4
#define SHMCTX_SLOT_PENDING                      8
#define SHMCTX_FLAG_UNLINKED                     1
#define SHMCTX_KIND_BYTES                        0
#define SHMCTX_KIND_ARRAY                        1
#define SHMCTX_KIND_OBJECT                       2
#define SHMCTX_PAYLOAD_ALIGN                     64

#endif /* SHMCTX_LAYOUT_H */
