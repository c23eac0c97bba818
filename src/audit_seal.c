/*-------------------------------------------------------------------------
 * audit_seal.c
 *	  Sealing the audit trail into a chain of blocks, and verifying it.
 *
 *	  Every transaction id below a snapshot's xmin has ended, so the audit
 *	  rows of those transactions can no longer change: the sealer takes the
 *	  rows with xid in [previous block's xid_to, xmin), orders them by (xid,
 *	  audit_id), and stores a block that lists them by record, with a tag of
 *	  each row's hash (its first 16 bytes), the Merkle root of their full
 *	  hashes, the database's identity and the hash of the previous block.
 *	  Writers never wait for it, nor it for them.
 *
 *	  Verification recomputes every row's hash from its values, every
 *	  block's Merkle root from its rows and its hash, and follows the chain;
 *	  each finding names the block and the row (the tag tells which row of
 *	  a block no longer hashes as it did).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/relscan.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/uuid.h"
#include "utils/xid8.h"

#include "orchestrator.h"
#include "audit.h"

int			orch_audit_seal_interval_ms = 500;
int			orch_audit_heartbeat_s = 60;

/* the most rows a block takes, unless one transaction wrote more */
#define MAX_BLOCK_ROWS		100000
/* rows fetched at a time while sealing or verifying */
#define FETCH_ROWS			10000

static bytea *
hash_bytea(const uint8 *h)
{
	bytea	   *b = palloc(VARHDRSZ + ORCH_HASH_LEN);

	SET_VARSIZE(b, VARHDRSZ + ORCH_HASH_LEN);
	memcpy(VARDATA(b), h, ORCH_HASH_LEN);
	return b;
}

/* A stored hash: exactly 32 bytes, else false. */
static bool
get_hash(Datum d, uint8 *out)
{
	bytea	   *b = DatumGetByteaPP(d);

	if (VARSIZE_ANY_EXHDR(b) != ORCH_HASH_LEN)
		return false;
	memcpy(out, VARDATA_ANY(b), ORCH_HASH_LEN);
	return true;
}

static char *
hex(const uint8 *h)
{
	static const char digits[] = "0123456789abcdef";
	char	   *s = palloc(2 * ORCH_HASH_LEN + 1);

	for (int i = 0; i < ORCH_HASH_LEN; i++)
	{
		s[2 * i] = digits[h[i] >> 4];
		s[2 * i + 1] = digits[h[i] & 15];
	}
	s[2 * ORCH_HASH_LEN] = '\0';
	return s;
}

static uint64
xid8_value(Datum d)
{
	return U64FromFullTransactionId(DatumGetFullTransactionId(d));
}

/* ------------------------------------------------------------------------
 * Sealing
 * ------------------------------------------------------------------------ */

#define LAST_BLOCK_SQL \
	"SELECT block_id, xid_to, block_hash, sealed_at FROM orch.audit_blocks" \
	" ORDER BY block_id DESC LIMIT 1"

#define HORIZON_SQL "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())"

#define RECORDS_TO_SEAL_SQL \
	"SELECT record_id, xid, n_events, hashes FROM orch.audit_records" \
	" WHERE xid >= $1 AND xid < $2 ORDER BY xid, record_id"

#define INSERT_BLOCK_SQL \
	"INSERT INTO orch.audit_blocks (block_id, xid_from, xid_to, sealed_at, n_rows, record_ids," \
	"                               record_rows, row_tags, merkle_root, system_identifier," \
	"                               timeline, prev_hash, block_hash)" \
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"

/*
 * Seal the audit rows of every transaction that has ended since the last
 * block into a new block; with heartbeat_due, write an empty block when
 * there are none.  Returns the number of rows sealed, or -1 when another
 * sealer holds the blocks (wait: false).  Needs a transaction; connects to
 * SPI itself.
 */
static int64
seal(bool heartbeat_due, bool wait)
{
	Oid			blocks = orch_relid("audit_blocks");
	OrchAuditBlock blk;
	uint64		horizon;
	uint64		xid_to;
	int64		n = 0;
	int64		cap = 1024;
	uint8	   *leaves;
	int64		nrec = 0;
	int64		reccap = 64;
	int64	   *rec_ids;
	int64	   *rec_rows;
	bytea	   *tags;
	Portal		portal;
	bool		isnull;
	uint8		block_hash[ORCH_HASH_LEN];
	Datum		args[13];
	Oid			types[2] = {XID8OID, XID8OID};
	bool		more = true;
	uint64		last_xid = 0;

	/* one sealer at a time; writers of audit rows are not affected */
	if (wait)
		LockRelationOid(blocks, ShareRowExclusiveLock);
	else if (!ConditionalLockRelationOid(blocks, ShareRowExclusiveLock))
		return -1;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	memset(&blk, 0, sizeof(blk));
	/* not read-only: a new snapshot, which sees the block of a sealer waited for */
	if (SPI_execute(LAST_BLOCK_SQL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the last audit block");
	if (SPI_processed > 0)
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		TimestampTz last_sealed;

		blk.block_id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull)) + 1;
		blk.xid_from = xid8_value(SPI_getbinval(t, d, 2, &isnull));
		if (!get_hash(SPI_getbinval(t, d, 3, &isnull), blk.prev_hash))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("audit block %lld has a block_hash that is not 32 bytes long",
							(long long) blk.block_id - 1),
					 errdetail("The chain cannot be continued from it."),
					 errhint("orch.verify_audit() reports what else was changed.")));
		last_sealed = DatumGetTimestampTz(SPI_getbinval(t, d, 4, &isnull));
		heartbeat_due = heartbeat_due &&
			GetCurrentTimestamp() - last_sealed >= (int64) orch_audit_heartbeat_s * USECS_PER_SEC;
	}
	else
	{
		/* the first block: from the first transaction id, after 32 zero bytes */
		blk.block_id = 1;
		blk.xid_from = 0;
		memset(blk.prev_hash, 0, ORCH_HASH_LEN);
	}

	/* a new snapshot: every transaction below its xmin has ended */
	if (SPI_execute(HORIZON_SQL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the snapshot's xmin");
	horizon = xid8_value(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	xid_to = Max(horizon, blk.xid_from);

	leaves = palloc(ORCH_HASH_LEN * cap);
	rec_ids = palloc(sizeof(int64) * reccap);
	rec_rows = palloc(sizeof(int64) * reccap);
	args[0] = FullTransactionIdGetDatum(FullTransactionIdFromU64(blk.xid_from));
	args[1] = FullTransactionIdGetDatum(FullTransactionIdFromU64(xid_to));
	/* a later statement, a later snapshot: it sees all those transactions' rows */
	portal = SPI_cursor_open_with_args(NULL, RECORDS_TO_SEAL_SQL, 2, types, args, NULL, false, 0);
	while (more)
	{
		SPI_cursor_fetch(portal, true, FETCH_ROWS / 100);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	t = SPI_tuptable->vals[i];
			TupleDesc	d = SPI_tuptable->tupdesc;
			int64		record_id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
			uint64		xid = xid8_value(SPI_getbinval(t, d, 2, &isnull));
			int32		n_events = DatumGetInt32(SPI_getbinval(t, d, 3, &isnull));
			bytea	   *hashes = DatumGetByteaPP(SPI_getbinval(t, d, 4, &isnull));

			/* a full block ends where the next transaction's events begin */
			if (n >= MAX_BLOCK_ROWS && xid != last_xid)
			{
				xid_to = xid;
				more = false;
				break;
			}
			last_xid = xid;
			if (n_events < 0 || n_events > ORCH_AUDIT_RECORD_EVENTS ||
				VARSIZE_ANY_EXHDR(hashes) != (Size) n_events * ORCH_HASH_LEN)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("audit record %lld does not hold a 32-byte hash for each of its %d events",
								(long long) record_id, n_events),
						 errdetail("Events are sealed with their hash; these cannot be."),
						 errhint("orch.verify_audit() reports what else was changed.")));
			while (n + n_events > cap)
			{
				cap *= 2;
				leaves = repalloc_huge(leaves, ORCH_HASH_LEN * cap);
			}
			if (nrec == reccap)
			{
				reccap *= 2;
				rec_ids = repalloc_huge(rec_ids, sizeof(int64) * reccap);
				rec_rows = repalloc_huge(rec_rows, sizeof(int64) * reccap);
			}
			rec_ids[nrec] = record_id;
			rec_rows[nrec++] = n_events;
			memcpy(leaves + n * ORCH_HASH_LEN, VARDATA_ANY(hashes), (Size) n_events * ORCH_HASH_LEN);
			n += n_events;
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);

	if (n == 0 && !heartbeat_due)
	{
		SPI_finish();
		return 0;
	}
	if (n == 0)
		xid_to = blk.xid_from;	/* a heartbeat covers no transaction */

	/*
	 * Each row's tag: the first bytes of its hash, in one value.  A
	 * transaction records at most ORCH_AUDIT_XACT_EVENTS events, so that
	 * they fit with a block's other rows; rows written past that (by hand)
	 * stop sealing here rather than make a block whose tags are cut short.
	 */
	if ((uint64) n > (MaxAllocSize - VARHDRSZ) / ORCH_AUDIT_TAG_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("audit block %lld would seal %lld rows, more than its tags can hold",
						(long long) blk.block_id, (long long) n),
				 errdetail("A transaction records at most %d audit events: rows past that were not written by the audit trail.",
						   ORCH_AUDIT_XACT_EVENTS),
				 errhint("Check the audit records with orch.verify_audit().")));
	tags = palloc_extended(VARHDRSZ + n * ORCH_AUDIT_TAG_LEN, MCXT_ALLOC_HUGE);
	SET_VARSIZE(tags, VARHDRSZ + n * ORCH_AUDIT_TAG_LEN);
	for (int64 i = 0; i < n; i++)
		memcpy(VARDATA(tags) + i * ORCH_AUDIT_TAG_LEN, leaves + i * ORCH_HASH_LEN, ORCH_AUDIT_TAG_LEN);

	blk.xid_to = xid_to;
	blk.sealed_at = GetCurrentTimestamp();
	blk.n_rows = n;
	orch_merkle_root(leaves, n, blk.merkle_root);
	blk.system_identifier = GetSystemIdentifier();
	blk.timeline = (int32) GetWALInsertionTimeLine();
	blk.nrecords = nrec;
	blk.record_ids = rec_ids;
	blk.record_rows = rec_rows;
	blk.row_tags = (const uint8 *) VARDATA(tags);
	orch_audit_block_hash(&blk, block_hash);

	{
		Oid			itypes[13] = {INT8OID, XID8OID, XID8OID, TIMESTAMPTZOID, INT8OID, INT8ARRAYOID,
			INT4ARRAYOID, BYTEAOID, BYTEAOID, NUMERICOID, INT4OID, BYTEAOID, BYTEAOID};
		Datum	   *idd = palloc(sizeof(Datum) * Max(nrec, 1));
		Datum	   *rowd = palloc(sizeof(Datum) * Max(nrec, 1));
		char		sysid[32];

		for (int64 i = 0; i < nrec; i++)
		{
			idd[i] = Int64GetDatum(rec_ids[i]);
			rowd[i] = Int32GetDatum((int32) rec_rows[i]);
		}
		snprintf(sysid, sizeof(sysid), UINT64_FORMAT, blk.system_identifier);
		args[0] = Int64GetDatum(blk.block_id);
		args[1] = FullTransactionIdGetDatum(FullTransactionIdFromU64(blk.xid_from));
		args[2] = FullTransactionIdGetDatum(FullTransactionIdFromU64(blk.xid_to));
		args[3] = TimestampTzGetDatum(blk.sealed_at);
		args[4] = Int64GetDatum(n);
		args[5] = PointerGetDatum(construct_array(idd, (int) nrec, INT8OID, 8, true, TYPALIGN_DOUBLE));
		args[6] = PointerGetDatum(construct_array(rowd, (int) nrec, INT4OID, 4, true, TYPALIGN_INT));
		args[7] = PointerGetDatum(tags);
		args[8] = PointerGetDatum(hash_bytea(blk.merkle_root));
		args[9] = DirectFunctionCall3(numeric_in, CStringGetDatum(sysid),
									  ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
		args[10] = Int32GetDatum(blk.timeline);
		args[11] = PointerGetDatum(hash_bytea(blk.prev_hash));
		args[12] = PointerGetDatum(hash_bytea(block_hash));
		if (SPI_execute_with_args(INSERT_BLOCK_SQL, 13, itypes, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "could not write audit block %lld", (long long) blk.block_id);
	}

	SPI_finish();
	return n;
}

int64
orch_audit_seal(bool heartbeat_due)
{
	return seal(heartbeat_due, false);
}

/*
 * orch.seal_audit(heartbeat): seal now, waiting for a sealer at work;
 * returns the number of rows sealed.  With heartbeat, an empty block is
 * written when there is nothing to seal.
 */
PG_FUNCTION_INFO_V1(orch_seal_audit);
Datum
orch_seal_audit(PG_FUNCTION_ARGS)
{
	bool		heartbeat = PG_GETARG_BOOL(0);
	int			save_heartbeat_s = orch_audit_heartbeat_s;
	int64		n;

	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("the audit trail cannot be sealed during recovery"),
				 errhint("The primary seals it; a standby receives its blocks.")));
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("orch.seal_audit cannot run inside a REPEATABLE READ or SERIALIZABLE transaction"),
				 errhint("Sealing needs a fresh snapshot for each of its steps; call it in READ COMMITTED.")));
	orch_audit_heartbeat_s = 0;		/* asked for: due whatever the interval */
	PG_TRY();
	{
		n = seal(heartbeat, true);
	}
	PG_FINALLY();
	{
		orch_audit_heartbeat_s = save_heartbeat_s;
	}
	PG_END_TRY();
	PG_RETURN_INT64(n);
}

/* ------------------------------------------------------------------------
 * Verification
 * ------------------------------------------------------------------------ */

typedef struct Verifier
{
	ReturnSetInfo *rsinfo;
	int64		findings;
} Verifier;

/* The value of a hexadecimal digit, or -1. */
static int
hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static void
report(Verifier *v, int64 block_id, int64 audit_id, const char *finding, const char *fmt,...)
	pg_attribute_printf(5, 6);

static void
report(Verifier *v, int64 block_id, int64 audit_id, const char *finding, const char *fmt,...)
{
	Datum		values[4];
	bool		nulls[4] = {block_id <= 0, audit_id <= 0, false, false};
	StringInfoData buf;
	va_list		ap;

	initStringInfo(&buf);
	for (;;)
	{
		int			needed;

		va_start(ap, fmt);
		needed = appendStringInfoVA(&buf, fmt, ap);
		va_end(ap);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	values[0] = Int64GetDatum(block_id);
	values[1] = Int64GetDatum(audit_id);
	values[2] = CStringGetTextDatum(finding);
	values[3] = CStringGetTextDatum(buf.data);
	tuplestore_putvalues(v->rsinfo->setResult, v->rsinfo->setDesc, values, nulls);
	pfree(buf.data);
	pfree(DatumGetPointer(values[2]));
	pfree(DatumGetPointer(values[3]));
	v->findings++;
}

/*
 * Blocks first to last are absent: a finding for each of the first
 * MISSING_EACH of them, then one for the rest, naming where they end (a
 * forged block or digest numbered in the billions must not make billions
 * of findings).  what says why, followed by the block's number or range.
 */
#define MISSING_EACH 1000

static void
report_missing(Verifier *v, int64 first, int64 last, const char *what)
{
	/* first is at least 1: last - first cannot overflow */
	int64		span = last - first;

	Assert(first >= 1 && first <= last);
	for (int64 k = 0; k <= span && k < MISSING_EACH; k++)
	{
		CHECK_FOR_INTERRUPTS();
		report(v, first + k, 0, "missing block", "%s %lld", what, (long long) (first + k));
	}
	if (span >= MISSING_EACH)
		report(v, first + MISSING_EACH, 0, "missing block", "%s %lld, nor any up to %lld (%lld blocks)",
			   what, (long long) (first + MISSING_EACH), (long long) last,
			   (long long) (span - MISSING_EACH + 1));
}

/*
 * A record's columns, in this order (that of orch_audit_column_map), as
 * the verifier reads them.
 */
#define RECORD_COLUMNS \
	"record_id, xid, at, n_events, events, hashes, run_ids, purge"

/*
 * The events of one record, read one by one: each one's hash recomputed
 * from the stored fields, and whether the record's stored hash for it
 * matches.  Events that do not split as the record says hash to nothing
 * (32 zero bytes), so that each is reported.
 */
typedef struct RecordEvents
{
	uint64		record_xid;
	int64		record_id;
	int			n;
	int			next;
	bool		well_formed;	/* the events split into n of them */
	OrchAuditEvents ev;
	const uint8 *hashes;		/* as stored, if hashes_ok */
	bool		hashes_ok;
	bool		runs_ok;		/* run_ids lists the runs of its events, each once */
	bool		purge_ok;		/* purge says whether it holds a purge's event */
	/* the current event */
	int64		audit_id;
	uint64		xid;
	uint8		h[ORCH_HASH_LEN];
	bool		stored_ok;
	bool		has_run;
	pg_uuid_t	run;
} RecordEvents;

/*
 * Does a record's run_ids (NULL: none) list the distinct runs of its
 * events, which the writer put there sorted?  It is not hashed; verify_run
 * finds a run's events by it.
 */
static bool
runs_match(const OrchAuditEvents *ev, ArrayType *run_ids)
{
	pg_uuid_t  *runs = palloc(sizeof(pg_uuid_t) * Max(ev->n, 1));
	int			nruns = 0;
	int			distinct;
	Datum	   *elems;
	bool	   *nulls;
	int			nelems = 0;

	for (int i = 0; i < ev->n; i++)
	{
		const OrchAuditField *run = &ev->fields[i * ORCH_AUDIT_EVENT_FIELDS + ORCH_AUDIT_FIELD_RUN_ID];

		if (!run->isnull && run->len == UUID_LEN)
			memcpy(runs[nruns++].data, run->data, UUID_LEN);
	}
	distinct = orch_audit_distinct_runs(runs, nruns);
	if (run_ids != NULL)
	{
		if (ARR_ELEMTYPE(run_ids) != UUIDOID || ARR_NDIM(run_ids) > 1)
			return false;
		deconstruct_array(run_ids, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR, &elems, &nulls, &nelems);
	}
	if (nelems != distinct)
		return false;
	for (int i = 0; i < nelems; i++)
		if (nulls[i] || memcmp(DatumGetUUIDP(elems[i])->data, runs[i].data, UUID_LEN) != 0)
			return false;
	return true;
}

/*
 * Does a record's purge flag (NULL: not a boolean, wrong) say whether one
 * of its statements is a purge's?  It is not hashed; verification finds
 * the purges by it.
 */
static bool
purge_matches(const OrchAuditEvents *ev, bool isnull, bool purge)
{
	bool		holds = false;

	for (int i = 0; i < ev->nstmts; i++)
		holds = holds || orch_audit_is_purge(&ev->stmts[i]);
	return !isnull && purge == holds;
}

/* Read a record's columns (RECORD_COLUMNS order, that of ORCH_AUDIT_COL_*). */
static void
record_events_load(RecordEvents *re, Datum *v, bool *n)
{
	bytea	   *events = n[ORCH_AUDIT_COL_EVENTS] ? NULL : DatumGetByteaPP(v[ORCH_AUDIT_COL_EVENTS]);
	bytea	   *hashes = n[ORCH_AUDIT_COL_HASHES] ? NULL : DatumGetByteaPP(v[ORCH_AUDIT_COL_HASHES]);
	bool		n_null = n[ORCH_AUDIT_COL_N_EVENTS];
	int32		n_events = n_null ? 0 : DatumGetInt32(v[ORCH_AUDIT_COL_N_EVENTS]);

	memset(re, 0, sizeof(*re));
	re->record_id = DatumGetInt64(v[ORCH_AUDIT_COL_RECORD_ID]);
	re->record_xid = xid8_value(v[ORCH_AUDIT_COL_XID]);
	/* a record claiming no events (or too many) is read as one, or 1,000, malformed */
	re->n = n_null ? 1 : Min(Max(n_events, 1), ORCH_AUDIT_RECORD_EVENTS);
	re->well_formed = events != NULL && !n_null && n_events == re->n &&
		orch_audit_split_events(VARDATA_ANY(events), (int) VARSIZE_ANY_EXHDR(events), re->n, &re->ev);
	re->hashes_ok = hashes != NULL && VARSIZE_ANY_EXHDR(hashes) == (Size) re->n * ORCH_HASH_LEN;
	re->hashes = re->hashes_ok ? (const uint8 *) VARDATA_ANY(hashes) : NULL;
	re->runs_ok = !re->well_formed ||
		runs_match(&re->ev, n[ORCH_AUDIT_COL_RUN_IDS] ? NULL : DatumGetArrayTypeP(v[ORCH_AUDIT_COL_RUN_IDS]));
	re->purge_ok = !re->well_formed ||
		purge_matches(&re->ev, n[ORCH_AUDIT_COL_PURGE], !n[ORCH_AUDIT_COL_PURGE] &&
					  DatumGetBool(v[ORCH_AUDIT_COL_PURGE]));
}

/* The record's next event; false after the last. */
static bool
record_events_next(RecordEvents *re)
{
	int			i;

	if (re->next >= re->n)
		return false;
	i = re->next++;
	re->audit_id = re->record_id * ORCH_AUDIT_RECORD_EVENTS + i;
	re->xid = re->record_xid;
	re->has_run = false;
	if (re->well_formed)
	{
		const OrchAuditField *run = &re->ev.fields[i * ORCH_AUDIT_EVENT_FIELDS +
												   ORCH_AUDIT_FIELD_RUN_ID];

		orch_audit_event_hash(re->xid, &re->ev.stmts[re->ev.stmt[i]].h, re->audit_id,
							  re->ev.base + re->ev.start[i], re->ev.middle[i],
							  re->ev.end[i] - re->ev.start[i], re->h);
		if (!run->isnull && run->len == UUID_LEN)
		{
			re->has_run = true;
			memcpy(re->run.data, run->data, UUID_LEN);
		}
	}
	else
		memset(re->h, 0, ORCH_HASH_LEN);
	re->stored_ok = re->well_formed && re->hashes_ok &&
		memcmp(re->hashes + (Size) i * ORCH_HASH_LEN, re->h, ORCH_HASH_LEN) == 0;
	return true;
}

/* rowscan_begin's `to` for a scan with no end */
#define NO_END	PG_UINT64_MAX

/*
 * The events of the records with xid in [from, to) (to NO_END: no end), in
 * (xid, record_id, place) order, read straight from the primary key's index
 * into a slot: the verifier's hot loop, with no copy of each record into a
 * result set.
 */
typedef struct RowScan
{
	Relation	rel;
	Relation	idx;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	int			col[ORCH_AUDIT_NCOLS];
	Datum		v[ORCH_AUDIT_NCOLS];
	bool		n[ORCH_AUDIT_NCOLS];
	bool		loaded;			/* re holds a record */
	RecordEvents re;			/* the record being read, and its current event */
	MemoryContext rowcxt;		/* what one record's checks allocate */
	MemoryContext oldcxt;
} RowScan;

static void
rowscan_begin(RowScan *rs, uint64 from, uint64 to)
{
	ScanKeyData keys[2];
	int			nkeys = 1;
	Oid			pk;

	rs->rel = table_open(orch_relid("audit_records"), AccessShareLock);
	orch_audit_column_map(RelationGetDescr(rs->rel), rs->col);
	pk = RelationGetPrimaryKeyIndex(rs->rel);
	if (!OidIsValid(pk))
		elog(ERROR, "orch.audit_records has no primary key");
	rs->idx = index_open(pk, AccessShareLock);
	ScanKeyInit(&keys[0], 1, BTGreaterEqualStrategyNumber, F_XID8GE,
				FullTransactionIdGetDatum(FullTransactionIdFromU64(from)));
	if (to != NO_END)
	{
		ScanKeyInit(&keys[1], 1, BTLessStrategyNumber, F_XID8LT,
					FullTransactionIdGetDatum(FullTransactionIdFromU64(to)));
		nkeys = 2;
	}
	rs->scan = index_beginscan(rs->rel, rs->idx, GetActiveSnapshot(), nkeys, 0);
	index_rescan(rs->scan, keys, nkeys, NULL, 0);
	rs->slot = table_slot_create(rs->rel, NULL);
	rs->loaded = false;
	rs->rowcxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit record",
									   ALLOCSET_DEFAULT_SIZES);
	rs->oldcxt = CurrentMemoryContext;
}

/* The next event, in rs->re; false at the end. */
static bool
rowscan_next(RowScan *rs)
{
	for (;;)
	{
		if (rs->loaded && record_events_next(&rs->re))
			return true;
		MemoryContextSwitchTo(rs->oldcxt);
		MemoryContextReset(rs->rowcxt);
		rs->loaded = false;
		CHECK_FOR_INTERRUPTS();
		if (!index_getnext_slot(rs->scan, ForwardScanDirection, rs->slot))
			return false;
		slot_getallattrs(rs->slot);
		for (int c = 0; c < ORCH_AUDIT_NCOLS; c++)
		{
			rs->v[c] = rs->slot->tts_values[rs->col[c]];
			rs->n[c] = rs->slot->tts_isnull[rs->col[c]];
		}
		MemoryContextSwitchTo(rs->rowcxt);
		record_events_load(&rs->re, rs->v, rs->n);
		rs->loaded = true;
	}
}

static void
rowscan_end(RowScan *rs)
{
	MemoryContextSwitchTo(rs->oldcxt);
	MemoryContextDelete(rs->rowcxt);
	ExecDropSingleTupleTableSlot(rs->slot);
	index_endscan(rs->scan);
	index_close(rs->idx, AccessShareLock);
	table_close(rs->rel, AccessShareLock);
}

/* Position of an id among a block's ids (sorted copy with positions). */
typedef struct IdPos
{
	int64		id;
	int			pos;
} IdPos;

static int
idpos_cmp(const void *a, const void *b)
{
	int64		x = ((const IdPos *) a)->id;
	int64		y = ((const IdPos *) b)->id;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* A block as read back, with the ids of its rows and their tags. */
typedef struct ReadBlock
{
	OrchAuditBlock b;
	bool		valid;			/* merkle_root, block_hash, records and tags well formed */
	bool		prev_ok;		/* prev_hash is 32 bytes */
	uint8		block_hash[ORCH_HASH_LEN];
	int64	   *ids;			/* its rows' audit_ids, from its records */
	int			nids;
	const uint8 *tags;
	int64		ntags;
	int			next;			/* where the next row is expected among ids */
	struct IdPos *index;		/* ids sorted, with their positions; built when needed */
	MemoryContext cxt;			/* where the block was read, and its index is built */
} ReadBlock;

#define BLOCK_COLUMNS \
	"block_id, xid_from, xid_to, sealed_at, n_rows, record_ids, record_rows, row_tags," \
	" merkle_root, system_identifier::pg_catalog.text, timeline, prev_hash, block_hash"

/*
 * An int8[] or int4[] column's values, as n int64s; false (and none) if it
 * is not a one-dimensional array of that type without NULLs.
 */
static bool
int_array(Datum d, Oid type, int64 **out, int *n)
{
	ArrayType  *arr = DatumGetArrayTypeP(d);
	Datum	   *elems;
	bool	   *nulls;

	*n = 0;
	*out = NULL;
	if (ARR_ELEMTYPE(arr) != type || ARR_NDIM(arr) > 1 || ARR_HASNULL(arr))
		return false;
	if (type == INT8OID)
		deconstruct_array(arr, INT8OID, 8, true, TYPALIGN_DOUBLE, &elems, &nulls, n);
	else
		deconstruct_array(arr, INT4OID, 4, true, TYPALIGN_INT, &elems, &nulls, n);
	*out = palloc(sizeof(int64) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		(*out)[i] = type == INT8OID ? DatumGetInt64(elems[i]) : DatumGetInt32(elems[i]);
	return true;
}

static void
read_block(HeapTuple t, TupleDesc d, ReadBlock *rb)
{
	bool		isnull;
	bytea	   *tags;
	int64	   *rec_ids = NULL;
	int64	   *rec_rows = NULL;
	int			nrec = 0;
	int			nrows = 0;
	int64		total = 0;
	char	   *sysid;

	memset(rb, 0, sizeof(*rb));
	rb->cxt = CurrentMemoryContext;
	rb->valid = true;
	rb->b.block_id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
	rb->b.xid_from = xid8_value(SPI_getbinval(t, d, 2, &isnull));
	rb->b.xid_to = xid8_value(SPI_getbinval(t, d, 3, &isnull));
	rb->b.sealed_at = DatumGetTimestampTz(SPI_getbinval(t, d, 4, &isnull));
	rb->b.n_rows = DatumGetInt64(SPI_getbinval(t, d, 5, &isnull));
	/* the records and their row counts: two arrays of one length, counts 0 to 1,000 */
	if (!int_array(SPI_getbinval(t, d, 6, &isnull), INT8OID, &rec_ids, &nrec) ||
		!int_array(SPI_getbinval(t, d, 7, &isnull), INT4OID, &rec_rows, &nrows) || nrec != nrows)
		rb->valid = false;
	for (int i = 0; rb->valid && i < nrec; i++)
	{
		if (rec_rows[i] < 0 || rec_rows[i] > ORCH_AUDIT_RECORD_EVENTS)
			rb->valid = false;
		total += rec_rows[i];
	}
	if (!rb->valid || total > (int64) (MaxAllocSize / sizeof(int64)))
	{
		rb->valid = false;
		nrec = 0;
		total = 0;
	}
	rb->ids = palloc(sizeof(int64) * Max(total, 1));
	for (int i = 0; i < nrec; i++)
		for (int e = 0; e < rec_rows[i]; e++)
			rb->ids[rb->nids++] = rec_ids[i] * ORCH_AUDIT_RECORD_EVENTS + e;
	rb->b.nrecords = nrec;
	rb->b.record_ids = rec_ids;
	rb->b.record_rows = rec_rows;
	/*
	 * A copy: a small block's tags stay in its row (they move out of line
	 * only when the row passes 2 kB), and verify_run frees the row as soon
	 * as it has read it.
	 */
	tags = DatumGetByteaPCopy(SPI_getbinval(t, d, 8, &isnull));
	if ((VARSIZE(tags) - VARHDRSZ) % ORCH_AUDIT_TAG_LEN != 0)
		rb->valid = false;
	rb->ntags = (VARSIZE(tags) - VARHDRSZ) / ORCH_AUDIT_TAG_LEN;
	rb->tags = (const uint8 *) VARDATA(tags);
	rb->b.row_tags = rb->tags;
	if (!get_hash(SPI_getbinval(t, d, 9, &isnull), rb->b.merkle_root))
		rb->valid = false;
	sysid = TextDatumGetCString(SPI_getbinval(t, d, 10, &isnull));
	rb->b.system_identifier = strtou64(sysid, NULL, 10);
	rb->b.timeline = DatumGetInt32(SPI_getbinval(t, d, 11, &isnull));
	rb->prev_ok = get_hash(SPI_getbinval(t, d, 12, &isnull), rb->b.prev_hash);
	if (!get_hash(SPI_getbinval(t, d, 13, &isnull), rb->block_hash))
		rb->valid = false;
}

/*
 * The block's own consistency: its row count and its hash (which covers
 * its records and tags).  Its Merkle root is checked against its rows
 * (check_block_rows).
 */
static void
check_block(Verifier *v, ReadBlock *rb)
{
	uint8		h[ORCH_HASH_LEN];

	if (!rb->valid || !rb->prev_ok)
	{
		report(v, rb->b.block_id, 0, "modified block",
			   "its hashes are not 32 bytes long, its tags not 16, or its records and their row counts do not pair up");
		return;
	}
	if (rb->nids != rb->ntags || rb->b.n_rows != rb->ntags)
	{
		report(v, rb->b.block_id, 0, "modified block",
			   "the block's records hold %d rows, it has %lld tags for %lld rows",
			   rb->nids, (long long) rb->ntags, (long long) rb->b.n_rows);
		return;
	}
	orch_audit_block_hash(&rb->b, h);
	if (memcmp(h, rb->block_hash, ORCH_HASH_LEN) != 0)
		report(v, rb->b.block_id, 0, "modified block",
			   "its contents hash to %s, the block says %s", hex(h), hex(rb->block_hash));
}

/*
 * Where a block lists a row, or -1.  Rows are read in the order the block
 * lists them, so the next position is tried first; the sorted index is
 * built only for a block whose rows do not come in that order (rows
 * missing or forged, or verify_run reading some of them).
 */
static int
block_position(ReadBlock *rb, int64 audit_id)
{
	IdPos		key = {audit_id, 0};
	IdPos	   *found;

	if (rb->next < rb->nids && rb->ids[rb->next] == audit_id)
		return rb->next++;
	if (rb->index == NULL)
	{
		/* not in the row's memory, which is reset for every row */
		rb->index = MemoryContextAllocHuge(rb->cxt, sizeof(IdPos) * Max(rb->nids, 1));
		for (int i = 0; i < rb->nids; i++)
		{
			rb->index[i].id = rb->ids[i];
			rb->index[i].pos = i;
		}
		qsort(rb->index, rb->nids, sizeof(IdPos), idpos_cmp);
	}
	found = bsearch(&key, rb->index, rb->nids, sizeof(IdPos), idpos_cmp);
	if (found == NULL)
		return -1;
	rb->next = found->pos + 1;
	return found->pos;
}

/*
 * A row of a sealed block's range, whose values hash to h: forged if the
 * block does not list it (or seen, when given, shows it listed already),
 * modified if h does not begin with the tag sealed for it (or the block's
 * rows and tags do not pair up).  With full, its hash is kept at its place
 * there, for the block's Merkle root.  Returns whether it was reported.
 */
static bool
check_sealed_row(Verifier *v, ReadBlock *rb, bool *seen, uint8 *full, int64 audit_id,
				 uint64 xid, const uint8 *h, bool stored_ok)
{
	int			pos = block_position(rb, audit_id);

	if (pos < 0 || (seen != NULL && seen[pos]))
	{
		report(v, rb->b.block_id, audit_id, "forged row",
			   "transaction %llu is sealed in this block, which does not list the row",
			   (unsigned long long) xid);
		return true;
	}
	if (seen != NULL)
		seen[pos] = true;
	if (full != NULL)
		memcpy(full + (int64) pos * ORCH_HASH_LEN, h, ORCH_HASH_LEN);
	if (rb->nids != rb->ntags ||
		memcmp(h, rb->tags + (int64) pos * ORCH_AUDIT_TAG_LEN, ORCH_AUDIT_TAG_LEN) != 0)
	{
		report(v, rb->b.block_id, audit_id, "modified row",
			   stored_ok ?
			   "the row and its stored hash were both rewritten after sealing" :
			   "the row's values do not match the hash sealed for it");
		return true;
	}
	return false;
}

/*
 * At a record's first event: a record whose run_ids does not list the runs
 * of its events hides them from verify_run, one whose purge flag is wrong
 * hides a purge or makes one up; reported once, at that event.
 */
static void
check_record_lookups(Verifier *v, int64 block_id, RecordEvents *re)
{
	if (re->next == 1 && !re->runs_ok)
		report(v, block_id, re->audit_id, "modified row",
			   "its record's run_ids does not list the runs of its events");
	if (re->next == 1 && !re->purge_ok)
		report(v, block_id, re->audit_id, "modified row",
			   "its record's purge flag does not match its events");
}

/*
 * Check the rows of a block's xid range against its ids and tags; and,
 * when each row it lists is there as sealed, its Merkle root against their
 * hashes (a row changed in a way its tag does not show).
 */
static void
check_block_rows(Verifier *v, ReadBlock *rb, bool purged)
{
	bool	   *seen = palloc0(sizeof(bool) * Max(rb->nids, 1));
	uint8	   *full = purged ? NULL :
		palloc_extended((Size) Max(rb->nids, 1) * ORCH_HASH_LEN, MCXT_ALLOC_HUGE);
	bool		intact = true;
	RowScan		rs;

	rowscan_begin(&rs, rb->b.xid_from, rb->b.xid_to);
	while (rowscan_next(&rs))
	{
		if (purged)
			report(v, rb->b.block_id, rs.re.audit_id, "forged row",
				   "the row is in a range that was purged");
		else
		{
			if (check_sealed_row(v, rb, seen, full, rs.re.audit_id, rs.re.xid, rs.re.h,
								 rs.re.stored_ok))
				intact = false;
			check_record_lookups(v, rb->b.block_id, &rs.re);
		}
	}
	rowscan_end(&rs);

	if (purged)
	{
		pfree(seen);
		return;
	}
	for (int i = 0; i < rb->nids; i++)
		if (!seen[i])
		{
			CHECK_FOR_INTERRUPTS();
			report(v, rb->b.block_id, rb->ids[i], "deleted row",
				   "the block lists the row, which is gone");
			intact = false;
		}
	if (intact && rb->valid && rb->nids == rb->ntags && rb->b.n_rows == rb->ntags)
	{
		uint8		h[ORCH_HASH_LEN];

		orch_merkle_root(full, rb->nids, h);
		if (memcmp(h, rb->b.merkle_root, ORCH_HASH_LEN) != 0)
			report(v, rb->b.block_id, 0, "modified block",
				   "its rows hash to the Merkle root %s, the block says %s",
				   hex(h), hex(rb->b.merkle_root));
	}
	pfree(seen);
	pfree(full);
}

/*
 * The highest block whose rows a purge removed, or 0.  A purge's event
 * counts before it is sealed, so that the trail verifies right after the
 * purge; an event forged into a sealed range is reported as a forged row.
 * A record that does not read back is reported as modified, and counts no
 * purge.
 */
static int64
purged_through(void)
{
	int64		through = 0;

	if (SPI_execute("SELECT n_events, events FROM orch.audit_records WHERE purge",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read audit purges");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		n_null;
		bool		events_null;
		Datum		n = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &n_null);
		Datum		events = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &events_null);
		bytea	   *ev_bytes;
		OrchAuditEvents ev;

		if (n_null || events_null)
			continue;
		ev_bytes = DatumGetByteaPP(events);
		if (!orch_audit_split_events(VARDATA_ANY(ev_bytes), (int) VARSIZE_ANY_EXHDR(ev_bytes),
									 DatumGetInt32(n), &ev))
			continue;
		for (int i = 0; i < ev.n; i++)
			if (orch_audit_is_purge(&ev.stmts[ev.stmt[i]]))
				through = Max(through, orch_audit_purge_block(&ev.fields[i * ORCH_AUDIT_EVENT_FIELDS +
																		 ORCH_AUDIT_FIELD_NEW_ROW]));
	}
	SPI_freetuptable(SPI_tuptable);
	return through;
}

/* Rows of transactions that no block covers, below the newest block: forged. */
static void
check_uncovered_rows(Verifier *v, uint64 from, uint64 to)
{
	RowScan		rs;

	rowscan_begin(&rs, from, to);
	while (rowscan_next(&rs))
		report(v, 0, rs.re.audit_id, "forged row",
			   "no block covers transaction %llu, below the newest block",
			   (unsigned long long) rs.re.xid);
	rowscan_end(&rs);
}

/*
 * orch.verify_audit(digest): every block, every row, the chain; and, given
 * a digest exported earlier (orch.audit_digest), that its block is still
 * there, unchanged.  Returns one row per finding.
 */
PG_FUNCTION_INFO_V1(orch_verify_audit);
Datum
orch_verify_audit(PG_FUNCTION_ARGS)
{
	Verifier	v;
	Portal		portal;
	int64		expect_id = 1;
	uint8		prev_hash[ORCH_HASH_LEN];
	bool		prev_hash_ok = false;
	int64		prev_id = 0;
	bool		prev_present;
	uint64		prev_xid_to = 0;
	bool		have_prev = false;
	int64		purged;
	Jsonb	   *digest = PG_ARGISNULL(0) ? NULL : PG_GETARG_JSONB_P(0);
	int64		digest_block = 0;
	uint8		digest_hash[ORCH_HASH_LEN];
	bool		digest_seen = false;
	MemoryContext blockcxt;

	v.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	v.findings = 0;
	InitMaterializedSRF(fcinfo, 0);

	if (digest != NULL)
	{
		bool		is_object = JB_ROOT_IS_OBJECT(digest);
		JsonbValue *jb = is_object ?
			getKeyJsonValueFromContainer(&digest->root, "block_id", 8, NULL) : NULL;
		JsonbValue *jh = is_object ?
			getKeyJsonValueFromContainer(&digest->root, "block_hash", 10, NULL) : NULL;
		bool		ok = jb != NULL && jh != NULL && jb->type == jbvNumeric && jh->type == jbvString &&
			jh->val.string.len == 2 * ORCH_HASH_LEN;

		if (ok)
		{
			/* a block number: digits alone, 1 or more */
			char	   *num = DatumGetCString(DirectFunctionCall1(numeric_out,
																  NumericGetDatum(jb->val.numeric)));

			digest_block = orch_audit_digits_int64(num, strlen(num));
			ok = digest_block >= 1;
			for (int i = 0; i < ORCH_HASH_LEN && ok; i++)
			{
				int			hi = hex_digit(jh->val.string.val[2 * i]);
				int			lo = hex_digit(jh->val.string.val[2 * i + 1]);

				ok = hi >= 0 && lo >= 0;
				digest_hash[i] = (uint8) (hi << 4 | lo);
			}
		}
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the digest must have \"block_id\" (a block number, 1 or more) and \"block_hash\" (64 hexadecimal digits)"),
					 errhint("Pass the document orch.audit_digest() returned.")));
	}

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	purged = purged_through();
	blockcxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit block",
									 ALLOCSET_DEFAULT_SIZES);

	portal = SPI_cursor_open_with_args(NULL,
									   "SELECT " BLOCK_COLUMNS " FROM orch.audit_blocks ORDER BY block_id",
									   0, NULL, NULL, NULL, true, 0);
	for (;;)
	{
		SPITupleTable *tt;

		SPI_cursor_fetch(portal, true, 1);
		if (SPI_processed == 0)
			break;
		tt = SPI_tuptable;
		{
			MemoryContext oldcxt = MemoryContextSwitchTo(blockcxt);
			ReadBlock	rb;

			read_block(tt->vals[0], tt->tupdesc, &rb);
			if (expect_id < rb.b.block_id)
				report_missing(&v, expect_id, rb.b.block_id - 1, "the chain has no block");
			/* the link to the block numbered just before it, when that one is there */
			prev_present = have_prev && prev_id == rb.b.block_id - 1;
			/* the next number expected; a block numbered PG_INT64_MAX is the last */
			if (rb.b.block_id >= expect_id)
				expect_id = rb.b.block_id < PG_INT64_MAX ? rb.b.block_id + 1 : PG_INT64_MAX;
			check_block(&v, &rb);
			if (!rb.prev_ok)
				report(&v, rb.b.block_id, 0, "broken link", "its prev_hash is not a 32-byte hash");
			else if (prev_present &&
					 (!prev_hash_ok || memcmp(prev_hash, rb.b.prev_hash, ORCH_HASH_LEN) != 0))
				report(&v, rb.b.block_id, 0, "broken link",
					   "it follows a block whose hash is %s, not %s",
					   prev_hash_ok ? hex(prev_hash) : "malformed", hex(rb.b.prev_hash));
			else if (rb.b.block_id == 1)
			{
				static const uint8 zeros[ORCH_HASH_LEN] = {0};

				if (memcmp(zeros, rb.b.prev_hash, ORCH_HASH_LEN) != 0)
					report(&v, 1, 0, "broken link", "the first block must follow 32 zero bytes");
				if (rb.b.xid_from != 0)
					report(&v, 1, 0, "broken link", "the first block must start at transaction 0");
			}
			if (prev_present && rb.b.xid_from != prev_xid_to)
				report(&v, rb.b.block_id, 0, "broken link",
					   "it covers transactions from %llu, the block before it ended at %llu",
					   (unsigned long long) rb.b.xid_from, (unsigned long long) prev_xid_to);
			/* rows below this block that no block covers (a block is missing) */
			if (rb.b.xid_from > prev_xid_to)
				check_uncovered_rows(&v, prev_xid_to, rb.b.xid_from);
			if (digest != NULL && rb.b.block_id == digest_block)
			{
				digest_seen = true;
				if (memcmp(rb.block_hash, digest_hash, ORCH_HASH_LEN) != 0)
					report(&v, rb.b.block_id, 0, "modified block",
						   "the exported digest has hash %s for this block, the chain has %s",
						   hex(digest_hash), hex(rb.block_hash));
			}
			check_block_rows(&v, &rb, rb.b.block_id <= purged);

			memcpy(prev_hash, rb.block_hash, ORCH_HASH_LEN);
			prev_hash_ok = rb.valid;
			prev_xid_to = Max(prev_xid_to, rb.b.xid_to);
			prev_id = rb.b.block_id;
			have_prev = true;
			MemoryContextSwitchTo(oldcxt);
			MemoryContextReset(blockcxt);
		}
		SPI_freetuptable(tt);
	}
	SPI_cursor_close(portal);

	if (digest != NULL && !digest_seen && expect_id <= digest_block)
		report_missing(&v, expect_id, digest_block,
					   psprintf("the exported digest names block %lld; the chain has no block",
								(long long) digest_block));

	/* rows not sealed yet: their own hash only */
	{
		RowScan		rs;

		rowscan_begin(&rs, prev_xid_to, NO_END);
		while (rowscan_next(&rs))
		{
			if (!rs.re.stored_ok)
				report(&v, 0, rs.re.audit_id, "modified row",
					   "the row's values do not match its hash (not sealed yet)");
			check_record_lookups(&v, 0, &rs.re);
		}
		rowscan_end(&rs);
	}
	SPI_finish();
	return (Datum) 0;
}

/*
 * One event of the run: against the block that sealed it (read when the
 * event is past the block at hand, with the block before it), or, not
 * sealed yet, against its own stored hash.
 */
static void
verify_run_event(Verifier *v, RecordEvents *re, ReadBlock *cur, bool *have_block,
				 MemoryContext blockcxt, int64 purged, uint64 sealed_to)
{
	bool		isnull;

	if (!*have_block || re->xid >= cur->b.xid_to || re->xid < cur->b.xid_from)
	{
		/* the block that sealed this row, and the one before it */
		Oid			btypes[1] = {XID8OID};
		Datum		bargs[1] = {FullTransactionIdGetDatum(FullTransactionIdFromU64(re->xid))};
		MemoryContext oldcxt;

		if (SPI_execute_with_args("SELECT " BLOCK_COLUMNS " FROM orch.audit_blocks"
								  " WHERE xid_from <= $1 AND $1 < xid_to",
								  1, btypes, bargs, NULL, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read audit blocks");
		*have_block = SPI_processed > 0;
		MemoryContextReset(blockcxt);
		if (*have_block)
		{
			oldcxt = MemoryContextSwitchTo(blockcxt);
			read_block(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, cur);
			MemoryContextSwitchTo(oldcxt);
			SPI_freetuptable(SPI_tuptable);
			check_block(v, cur);
			if (cur->b.block_id > 1)
			{
				Datum		pargs[1] = {Int64GetDatum(cur->b.block_id - 1)};
				Oid			ptypes[1] = {INT8OID};
				uint8		ph[ORCH_HASH_LEN];

				if (SPI_execute_with_args("SELECT block_hash FROM orch.audit_blocks WHERE block_id = $1",
										  1, ptypes, pargs, NULL, true, 1) != SPI_OK_SELECT)
					elog(ERROR, "could not read audit blocks");
				if (SPI_processed == 0)
					report(v, cur->b.block_id - 1, 0, "missing block",
						   "the block before block %lld is gone", (long long) cur->b.block_id);
				else if (!get_hash(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull), ph) ||
						 memcmp(ph, cur->b.prev_hash, ORCH_HASH_LEN) != 0)
					report(v, cur->b.block_id, 0, "broken link",
						   "the block before it does not have the hash it follows");
				SPI_freetuptable(SPI_tuptable);
			}
		}
		else
			SPI_freetuptable(SPI_tuptable);
	}
	if (!*have_block)
	{
		if (re->xid < sealed_to)
			report(v, 0, re->audit_id, "forged row",
				   "no block covers transaction %llu, below the newest block",
				   (unsigned long long) re->xid);
		else if (!re->stored_ok)
			report(v, 0, re->audit_id, "modified row",
				   "the row's values do not match its hash (not sealed yet)");
		return;
	}
	if (cur->b.block_id <= purged)
	{
		report(v, cur->b.block_id, re->audit_id, "forged row",
			   "the row is in a range that was purged");
		return;
	}
	(void) check_sealed_row(v, cur, NULL, NULL, re->audit_id, re->xid, re->h, re->stored_ok);
}

/*
 * orch.verify_run(run_id): the audit rows of one run, each against its
 * stored hash and the block that sealed it, and those blocks against their
 * own hash, their Merkle root and the block before them.
 */
PG_FUNCTION_INFO_V1(orch_verify_run);
Datum
orch_verify_run(PG_FUNCTION_ARGS)
{
	Datum		run_id = PG_GETARG_DATUM(0);
	Verifier	v;
	Portal		portal;
	Oid			types[1] = {UUIDOID};
	Datum		args[1] = {run_id};
	ReadBlock	cur;
	bool		have_block = false;
	MemoryContext blockcxt;		/* the current block's ids, tags, index */
	MemoryContext recordcxt;	/* the current record's events */
	int64		purged;
	uint64		sealed_to = 0;	/* the newest block's xid_to */
	bool		isnull;

	v.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	v.findings = 0;
	InitMaterializedSRF(fcinfo, 0);
	memset(&cur, 0, sizeof(cur));
	blockcxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit block",
									 ALLOCSET_DEFAULT_SIZES);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	purged = purged_through();
	if (SPI_execute("SELECT pg_catalog.max(xid_to) FROM orch.audit_blocks", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read audit blocks");
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			sealed_to = xid8_value(d);
		SPI_freetuptable(SPI_tuptable);
	}
	/* the records that hold events of the run, found by their run_ids */
	portal = SPI_cursor_open_with_args(NULL,
									   "SELECT " RECORD_COLUMNS " FROM orch.audit_records"
									   " WHERE run_ids OPERATOR(pg_catalog.@>) ARRAY[$1]"
									   " ORDER BY xid, record_id",
									   1, types, args, NULL, true, 0);
	recordcxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit record",
									  ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		SPITupleTable *rows;

		SPI_cursor_fetch(portal, true, FETCH_ROWS / 100);
		if (SPI_processed == 0)
			break;
		rows = SPI_tuptable;
		for (uint64 i = 0; i < rows->numvals; i++)
		{
			Datum		rv[ORCH_AUDIT_NCOLS];
			bool		rn[ORCH_AUDIT_NCOLS];
			RecordEvents re;
			MemoryContext oldcxt = MemoryContextSwitchTo(recordcxt);

			for (int c = 0; c < ORCH_AUDIT_NCOLS; c++)
				rv[c] = SPI_getbinval(rows->vals[i], rows->tupdesc, c + 1, &rn[c]);
			record_events_load(&re, rv, rn);
			MemoryContextSwitchTo(oldcxt);
			while (record_events_next(&re))
			{
				/* a record that does not read back: each of its events counts */
				if (re.well_formed &&
					(!re.has_run || memcmp(re.run.data, DatumGetUUIDP(run_id)->data, UUID_LEN) != 0))
					continue;
				verify_run_event(&v, &re, &cur, &have_block, blockcxt, purged, sealed_to);
			}
			MemoryContextReset(recordcxt);
		}
		SPI_freetuptable(rows);
	}
	SPI_cursor_close(portal);
	SPI_finish();
	return (Datum) 0;
}

/*
 * orch.purge_audit(before): remove the rows of the blocks sealed before
 * `before`, whole blocks only; the blocks stay, so the chain still
 * verifies.  The purge is recorded as an audit event.  Returns the number
 * of rows removed.
 */
PG_FUNCTION_INFO_V1(orch_purge_audit);
Datum
orch_purge_audit(PG_FUNCTION_ARGS)
{
	TimestampTz before = PG_GETARG_TIMESTAMPTZ(0);
	Datum		args[2];
	Oid			types[2] = {TIMESTAMPTZOID, XID8OID};
	bool		isnull;
	int64		through;
	uint64		xid_to;
	int64		removed = 0;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* no sealer may add a block meanwhile: the range must stay whole */
	LockRelationOid(orch_relid("audit_blocks"), ShareRowExclusiveLock);
	args[0] = TimestampTzGetDatum(before);
	if (SPI_execute_with_args("SELECT block_id, xid_to FROM orch.audit_blocks"
							  " WHERE sealed_at < $1 ORDER BY block_id DESC LIMIT 1",
							  1, types, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read audit blocks");
	if (SPI_processed == 0)
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}
	through = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	xid_to = xid8_value(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));

	args[1] = FullTransactionIdGetDatum(FullTransactionIdFromU64(xid_to));
	orch_audit_purging = true;
	PG_TRY();
	{
		if (SPI_execute_with_args("WITH gone AS (DELETE FROM orch.audit_records"
								  "               WHERE xid < $2 AND $1 IS NOT NULL RETURNING n_events)"
								  " SELECT COALESCE(pg_catalog.sum(n_events), 0)::bigint FROM gone",
								  2, types, args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not purge audit rows");
		removed = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	PG_FINALLY();
	{
		orch_audit_purging = false;
	}
	PG_END_TRY();
	SPI_finish();

	/* the purge itself, as an event of the audit trail */
	{
		Datum		eargs[3] = {Int64GetDatum(through), Int64GetDatum(removed), TimestampTzGetDatum(before)};
		Oid			etypes[3] = {INT8OID, INT8OID, TIMESTAMPTZOID};

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute_with_args("SELECT orch._audit_event('orch.audit_log', 'PURGE',"
								  "  pg_catalog.jsonb_build_object('purged_through_block', $1,"
								  "                                'rows', $2, 'before', $3))",
								  3, etypes, eargs, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not record the purge");
		SPI_finish();
	}
	PG_RETURN_INT64(removed);
}
