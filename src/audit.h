/*-------------------------------------------------------------------------
 * audit.h
 *	  The audit trail's rows and blocks, their canonical encoding and hashes
 *	  (audit.c), sealing and verification (audit_seal.c).
 *-------------------------------------------------------------------------
 */
#ifndef ORCH_AUDIT_H
#define ORCH_AUDIT_H

#include "access/tupdesc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* the first byte of every encoding; docs/audit.md describes version 1 */
#define ORCH_AUDIT_ENCODING_VERSION	1
#define ORCH_HASH_LEN				32

/* One row of orch.audit_log, as its hash sees it. */
typedef struct OrchAuditRow
{
	int64		audit_id;
	uint64		xid;
	TimestampTz at;
	const char *table_name;
	const char *operation;
	Jsonb	   *row_key;		/* NULL: SQL NULL */
	Jsonb	   *old_row;
	Jsonb	   *new_row;
	const char *actor;
	const char *db_user;
	const char *session_role;
	pg_uuid_t  *run_id;
	bool		has_step;
	int64		step_id;
	const char *reason;
} OrchAuditRow;

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
} OrchAuditBlock;

extern char *orch_audit_actor;
extern char *orch_audit_reason;
extern int	orch_audit_seal_interval_ms;
extern int	orch_audit_heartbeat_s;
extern bool orch_audit_purging;

/* orch.audit_log's columns, in the order the encoding takes them */
#define ORCH_AUDIT_NCOLS	15
extern void orch_audit_column_map(TupleDesc desc, int *col);

extern void orch_sha256(const void *data, size_t len, uint8 *out);
extern void orch_audit_row_hash(const OrchAuditRow *r, uint8 *out);
extern void orch_audit_block_hash(const OrchAuditBlock *b, uint8 *out);
extern void orch_merkle_root(const uint8 *leaves, int64 n, uint8 *out);

/* the step whose function runs now: its business-table changes carry it */
extern void orch_audit_set_step(Datum run_id, int64 step_id);
extern void orch_audit_clear_step(void);

/* audit_seal.c: seal finished rows into a block; -1 if another sealer holds the lock */
extern int64 orch_audit_seal(bool heartbeat_due);

#endif							/* ORCH_AUDIT_H */
