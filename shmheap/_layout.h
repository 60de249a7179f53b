/* Shared-memory layouts the native core reads and writes, defined once for C.
 *
 * The Python modules define the same numbers (liveness.py, control.py,
 * pages.py, allocator.py, roots.py); tests/test_native.py checks that the two agree
 * byte for byte, through _native.LAYOUT, which exports every one of these.
 */
#ifndef SHMHEAP_LAYOUT_H
#define SHMHEAP_LAYOUT_H

/* liveness.py: the liveness segment shmheap.NAME.live */
#define LIVE_OWNER_OFFSET 8          /* u64: token of the heap-lock holder, 0 if none */
#define LIVE_RECOVERIES_OFFSET 16    /* u64: adopted locks */
#define LIVE_LAST_RECOVERY_OFFSET 24 /* u64: wall clock (ns) of the last adoption */
#define LIVE_REPAIRS_OFFSET 32       /* u64: journal repairs */
#define LIVE_LOCK_SEQ_OFFSET 48      /* u64: +1 on every acquisition */
#define LIVE_WAITER_OFFSET 56        /* u64: token of a waiting process (a hint), 0 if none */
#define LIVE_SLOTS_OFFSET 64         /* the process slots */
#define LIVE_SLOT_SIZE 32
#define LIVE_SLOT_PID 0              /* u32 */
#define LIVE_SLOT_EPOCH 4            /* u32 */
#define LIVE_REPAIR_BYTE 1           /* OFD-locked by the one process deciding to adopt */

/* control.py: the control segment shmheap.NAME */
#define CONTROL_HEADER_OFFSET 64     /* u64: generation << 32 | len of the index */
#define CONTROL_JOURNAL_OFFSET 120   /* u64: op << 56 | arena + 1 of an unfinished mutation */
#define CONTROL_JOURNAL_ARG_OFFSET 128 /* u64: the op's argument, written before the journal */
#define CONTROL_DESTROYED_OFFSET 136 /* u64: 1 once destroy() has begun to unlink the heap */
#define CONTROL_ROOTS_OP 4           /* the journal's op while a root is bound or unbound */
#define CONTROL_COORD_OP 6           /* the journal's op while a coordination record changes */

/* pages.py: an arena's page metadata, after its data and 64-byte trailer */
#define META_SEQ_OFFSET 8            /* u64: span records' sequence word (seqlock) */

/* allocator.py: a small span starts with nelems alloc bytes, then nelems mark bytes, the
 * slots' slacks (1 or 2 bytes each) and their holder words (u32 each, 4-aligned) */
#define SPAN_ALIGN 16
#define SPAN_HOLDER_SIZE 4

/* coord.py: the coordination segment shmheap.NAME.coord, as u64 words: the intent record
 * in the header page, then records of COORD_RECORD_WORDS words; a queue's nodes */
#define COORD_HEADER_WORDS 512
#define COORD_RECORD_WORDS 16
#define COORD_RECORDS 256
#define COORD_FUTEX 8                /* record word: futex word (low half), sleepers (bit 32) */
#define COORD_PARAM 9
#define COORD_HEAD 10                /* head, tail, count, leases, leased, closed */
#define COORD_INTENT 8               /* record, op, 6 saved words, node a, its next, node b,
                                      * its next, node to free, owner, node to hold again */
#define COORD_OP_PUT 1
#define COORD_OP_TAKE 2
#define COORD_NODE_HEADER 24         /* next, tag (kind << 56 | length), leaser token */
#define COORD_KIND_INT 1
#define COORD_KIND_PICKLE 2

/* roots.py: the roots segment shmheap.NAME.roots; its header page, then ROOTS_REGIONS
 * regions, region r of cap = ROOTS_FIRST_CAP << (r >> 1) slots (a region header, cap
 * slots of key and value u64, then ROOTS_NAME_BYTES_PER_SLOT * cap bytes of names) */
#define ROOTS_TABLE_OFFSET 16        /* u64: the region that is the table */
#define ROOTS_BUILT_OFFSET 24        /* u64: bit r set once region r is built */
#define ROOTS_INTENT_OFFSET 64       /* 11 u64: the intent record of a bind or unbind */
#define ROOTS_INTENT_WORDS 11
#define ROOTS_INSERT 1               /* intent ops: a new name's key is published */
#define ROOTS_UPDATE 2               /* ... or a slot's value changes */
#define ROOTS_REGIONS 26
#define ROOTS_FIRST_CAP 256
#define ROOTS_REGION_HEADER 64
#define ROOTS_SEQ_OFFSET 0           /* u64 of a region: odd while it changes */
#define ROOTS_LIVE_OFFSET 8          /* u64 of a region: roots bound */
#define ROOTS_USED_OFFSET 16         /* u64 of a region: slots with a key */
#define ROOTS_NAMES_END_OFFSET 24    /* u64 of a region: bytes of names in use */
#define ROOTS_SLOT_BYTES 16
#define ROOTS_NAME_BYTES_PER_SLOT 64
#define ROOTS_MAX_NAME 255

#endif
