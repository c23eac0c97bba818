/*-------------------------------------------------------------------------
 * audit.h
 *	  The audit trail's rows and blocks, their canonical encoding and hashes
 *	  (audit.c), sealing and verification (audit_seal.c).
 *-------------------------------------------------------------------------
 */
#ifndef ORCH_AUDIT_H
#define ORCH_AUDIT_H

#include "access/tupdesc.h"
#include "catalog/pg_trigger.h"
#include "executor/tuptable.h"
#include "lib/stringinfo.h"
#include "nodes/nodes.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"
#include "utils/reltrigger.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* the first byte of every encoding; docs/audit.md describes version 1 */
#define ORCH_AUDIT_ENCODING_VERSION	1
/* RFC 6962's prefixes of a leaf's and a node's hash input */
#define ORCH_MERKLE_LEAF_PREFIX		0x00
#define ORCH_MERKLE_NODE_PREFIX		0x01
#define ORCH_HASH_LEN				32

/* a record holds the events of one transaction, at most this many */
#define ORCH_AUDIT_RECORD_EVENTS	1000

/*
 * A transaction records at most this many events, those of its
 * subtransactions rolled back included: a block seals transactions whole,
 * and its 16-byte tag of each row is one value, at most 1 GB with the
 * 100,000 rows of the transactions before it (audit_seal.c).
 */
#define ORCH_AUDIT_XACT_EVENTS		64000000
/* a block keeps this much of each row's hash: enough to name a row that changed */
#define ORCH_AUDIT_TAG_LEN			16

/*
 * What the events of one statement share, as a record's events hold it
 * once per statement: the fields at, table_name, operation, then actor,
 * db_user, session_role (from who on), then reason (from why on), in the
 * canonical encoding.  An event's own fields interleave with these three
 * runs in its encoding (docs/audit.md).
 */
typedef struct OrchAuditHeader
{
	const char *data;
	int			who;
	int			why;
	int			len;
} OrchAuditHeader;

#define ORCH_AUDIT_STMT_FIELDS		7

/* where each of a statement's fields is in OrchAuditStmt.fields */
#define ORCH_AUDIT_STMT_AT			0
#define ORCH_AUDIT_STMT_TABLE		1
#define ORCH_AUDIT_STMT_OPERATION	2
#define ORCH_AUDIT_STMT_ACTOR		3	/* then db_user, session_role */
#define ORCH_AUDIT_STMT_REASON		6

/* the table and operation of a purge's statement (orch.purge_audit) */
#define ORCH_AUDIT_PURGE_TABLE		"orch.audit_log"
#define ORCH_AUDIT_PURGE_OPERATION	"PURGE"

/*
 * An event's own fields, as stored in a record's events: row_key, old_row,
 * new_row, run_id, step_id, each a field of the canonical encoding.  The
 * first three precede actor in the event's encoding, the last two follow
 * session_role.
 */
#define ORCH_AUDIT_EVENT_FIELDS		5

typedef struct OrchAuditField
{
	bool		isnull;
	const char *data;			/* the value's bytes, len of them */
	uint32		len;
} OrchAuditField;

/* where each of an event's fields is in OrchAuditEvents.fields */
#define ORCH_AUDIT_FIELD_NEW_ROW	2
#define ORCH_AUDIT_FIELD_RUN_ID		3
#define ORCH_AUDIT_FIELD_STEP_ID	4

/* A statement of a record, split: its shared fields. */
typedef struct OrchAuditStmt
{
	OrchAuditHeader h;
	OrchAuditField fields[ORCH_AUDIT_STMT_FIELDS];
} OrchAuditStmt;

/*
 * A record's events, split: where each one's fields start, its middle (the
 * run_id field), its end, the fields themselves, and its statement.
 */
typedef struct OrchAuditEvents
{
	int			n;
	const char *base;
	int		   *start;			/* event i is [start[i], end[i]) */
	int		   *end;
	int		   *middle;			/* where event i's run_id field starts, from start[i] */
	OrchAuditField *fields;		/* event i's are fields[i * ORCH_AUDIT_EVENT_FIELDS ...] */
	int		   *stmt;			/* event i's statement is stmts[stmt[i]] */
	int			nstmts;
	OrchAuditStmt *stmts;
} OrchAuditEvents;

/* The 4 bytes at p, a big-endian unsigned integer as the encoding writes it. */
static inline uint32
orch_be32(const char *p)
{
	const unsigned char *u = (const unsigned char *) p;

	return ((uint32) u[0] << 24) | ((uint32) u[1] << 16) | ((uint32) u[2] << 8) | u[3];
}

/* The 8 bytes at p, a big-endian unsigned integer as the encoding writes it. */
static inline uint64
orch_be64(const char *p)
{
	return ((uint64) orch_be32(p) << 32) | orch_be32(p + 4);
}

/* One row of orch.audit_blocks, as its hash sees it. */
typedef struct OrchAuditBlock
{
	int64		block_id;
	uint64		xid_from;
	uint64		xid_to;
	TimestampTz sealed_at;
	int64		n_rows;
	uint8		merkle_root[ORCH_HASH_LEN];
	uint64		system_identifier;
	int32		timeline;
	uint8		prev_hash[ORCH_HASH_LEN];
	/* the rows, by record: nrecords ids and row counts, n_rows tags */
	int64		nrecords;
	const int64 *record_ids;
	const int64 *record_rows;
	const uint8 *row_tags;		/* ORCH_AUDIT_TAG_LEN bytes a row */
} OrchAuditBlock;

extern char *orch_audit_actor;
extern char *orch_audit_reason;
extern int	orch_audit_seal_interval_ms;
extern int	orch_audit_heartbeat_s;
extern bool orch_audit_purging;

/* orch.audit_records' columns, in the order of its definition */
enum
{
	ORCH_AUDIT_COL_RECORD_ID, ORCH_AUDIT_COL_XID, ORCH_AUDIT_COL_AT, ORCH_AUDIT_COL_N_EVENTS,
	ORCH_AUDIT_COL_EVENTS, ORCH_AUDIT_COL_HASHES, ORCH_AUDIT_COL_RUN_IDS, ORCH_AUDIT_COL_PURGE,
	ORCH_AUDIT_NCOLS
};
extern void orch_audit_column_map(TupleDesc desc, int *col);

extern void orch_sha256(const void *data, size_t len, uint8 *out);
extern void orch_sha256_parts(int n, const void *const *data, const size_t *len, uint8 *out);
extern void orch_audit_event_hash(uint64 xid, const OrchAuditHeader *h, int64 audit_id,
								  const char *event, int middle, int len, uint8 *out);
extern bool orch_audit_split_events(const char *data, int len, int n, OrchAuditEvents *ev);
extern bool orch_audit_is_purge(const OrchAuditStmt *stmt);
extern Jsonb *orch_audit_decode_json(const OrchAuditField *f, bool *ok);
extern int64 orch_audit_purge_block(const OrchAuditField *detail);
extern int64 orch_audit_digits_int64(const char *s, size_t len);
extern int	orch_audit_distinct_runs(pg_uuid_t *runs, int n);
extern void orch_audit_block_hash(const OrchAuditBlock *b, uint8 *out);
extern void orch_merkle_root(const uint8 *leaf_hashes, int64 n, uint8 *out);

/* the step whose function runs now: its business-table changes carry it */
extern void orch_audit_set_step(Datum run_id, int64 step_id);
extern void orch_audit_clear_step(void);
extern void orch_audit_before_utility(void);
extern void orch_audit_register_callbacks(void);

/*
 * The events of rows the engine writes without the executor, as the
 * table's orch._audit() trigger would record them (NULL from begin: it
 * would not fire).  add: an UPDATE's row before and after, an INSERT's
 * after, a DELETE's before.
 */
typedef struct OrchAuditRows OrchAuditRows;
extern OrchAuditRows *orch_audit_rows_begin(Relation rel, CmdType op);
extern void orch_audit_rows_add(OrchAuditRows *a, TupleTableSlot *before, TupleTableSlot *after);
extern void orch_audit_rows_end(OrchAuditRows *a);
extern bool orch_audit_trigger_of(const Trigger *t, CmdType op);

/* Does the trigger fire on op (an UPDATE, INSERT or DELETE)? */
static inline bool
orch_trigger_of(const Trigger *t, CmdType op)
{
	return op == CMD_UPDATE ? TRIGGER_FOR_UPDATE(t->tgtype) :
		op == CMD_INSERT ? TRIGGER_FOR_INSERT(t->tgtype) : TRIGGER_FOR_DELETE(t->tgtype);
}

/* audit_seal.c: seal finished rows into a block; -1 if another sealer holds the lock */
extern int64 orch_audit_seal(bool heartbeat_due);

#endif							/* ORCH_AUDIT_H */
