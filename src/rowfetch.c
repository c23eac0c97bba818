/*-------------------------------------------------------------------------
 * rowfetch.c
 *	  One row of an orchestrator table by a unique key, without the executor.
 *
 *	  A worker's verdict on a task reads four rows, each by a unique key:
 *	  the step by its lease token, the step's run (both locked FOR UPDATE),
 *	  the step's definition and its circuit.  As one SQL statement that is
 *	  a plan of a dozen nodes, each with a tuple descriptor built from its
 *	  target list, set up and torn down for every verdict: two thirds of
 *	  the statement's cost went to its set-up.  Here each row is one probe
 *	  of its key's index, and only the columns asked for are copied out.
 *
 *	  Row locks follow SELECT ... FOR UPDATE (ExecLockRows): in READ
 *	  COMMITTED a row updated since the snapshot is locked in its newest
 *	  version, whose key is then checked again (a version without the key:
 *	  no row); in REPEATABLE READ and SERIALIZABLE such a row is a
 *	  serialization failure.
 *
 *	  What is looked up once per session (the table's and the index's
 *	  OIDs, the columns' numbers, the key's equality functions) is
 *	  forgotten when the relcache entry of the table or the index is
 *	  invalidated: ALTER TABLE, DROP, an extension update.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/genam.h"
#include "access/nbtree.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/sinval.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "orchestrator.h"

/* The OID of orch.<name>, a table or an index of the extension's. */
Oid
orch_relid(const char *name)
{
	Oid			relid = get_relname_relid(name, get_namespace_oid("orch", false));

	if (!OidIsValid(relid))
		elog(ERROR, "orch.%s is missing", name);
	return relid;
}

/* every source prepared in this session, for the invalidation callback */
static OrchRowSource *prepared_sources = NULL;
static bool callback_registered = false;

static void
sources_invalidate(Datum arg, Oid relid)
{
	for (OrchRowSource *s = prepared_sources; s != NULL; s = s->next)
		if (!OidIsValid(relid) || relid == s->relid || relid == s->indexid)
			s->ready = false;
}

/* Resolve what src names: the table, its key's index, columns, key functions. */
static void
source_prepare(OrchRowSource *src)
{
	Relation	rel;
	Relation	idx;
	TupleDesc	desc;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(sources_invalidate, (Datum) 0);
		callback_registered = true;
	}
	src->ready = false;
	Assert(src->nkeys >= 1 && src->nkeys <= ORCH_ROW_MAX_KEYS);
	Assert(src->ncols >= 0 && src->ncols <= ORCH_ROW_MAX_COLS);

	/*
	 * The names to OIDs, then lock them (until the transaction ends, as the
	 * executor would).  DDL that committed while we waited for a lock (the
	 * index built anew) may have given a name another OID: when any
	 * invalidation came meanwhile, look the names up again.
	 */
	for (;;)
	{
		uint64		invals = SharedInvalidMessageCounter;

		src->relid = orch_relid(src->table);
		src->indexid = orch_relid(src->index);
		LockRelationOid(src->relid, AccessShareLock);
		LockRelationOid(src->indexid, AccessShareLock);
		if (invals == SharedInvalidMessageCounter)
			break;
		UnlockRelationOid(src->indexid, AccessShareLock);
		UnlockRelationOid(src->relid, AccessShareLock);
	}
	rel = table_open(src->relid, NoLock);
	idx = index_open(src->indexid, NoLock);
	if (idx->rd_index->indrelid != src->relid || !idx->rd_index->indisunique ||
		idx->rd_rel->relam != BTREE_AM_OID ||
		IndexRelationGetNumberOfKeyAttributes(idx) != src->nkeys)
		elog(ERROR, "orch.%s is not a unique btree index of %d columns on orch.%s",
			 src->index, src->nkeys, src->table);

	/*
	 * An index being built or dropped concurrently, or left invalid by a
	 * build that failed, does not have every row.  (A partial index, such
	 * as steps_lease_token, must cover every key looked up in it.)
	 */
	if (!idx->rd_index->indisvalid || !idx->rd_index->indisready ||
		!idx->rd_index->indislive || !idx->rd_index->indimmediate)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("index orch.%s is not usable", src->index),
				 errdetail("It is invalid, not ready, being dropped, or its uniqueness is deferred."),
				 errhint("Rebuild it with REINDEX INDEX orch.%s.", src->index)));
	for (int k = 0; k < src->nkeys; k++)
	{
		Oid			opno = get_opfamily_member(idx->rd_opfamily[k], idx->rd_opcintype[k],
											   idx->rd_opcintype[k], BTEqualStrategyNumber);

		if (!OidIsValid(opno))
			elog(ERROR, "no equality operator for column %d of orch.%s", k + 1, src->index);
		src->key_eq[k] = get_opcode(opno);
		src->key_collation[k] = idx->rd_indcollation[k];
		src->key_attnum[k] = idx->rd_index->indkey.values[k];
		if (src->key_attnum[k] == 0)
			elog(ERROR, "orch.%s has an expression among its key columns", src->index);
	}

	desc = RelationGetDescr(rel);
	for (int c = 0; c < src->ncols; c++)
	{
		src->attnum[c] = InvalidAttrNumber;
		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), src->cols[c]) == 0)
			{
				src->attnum[c] = att->attnum;
				src->typbyval[c] = att->attbyval;
				src->typlen[c] = att->attlen;
				break;
			}
		}
		if (src->attnum[c] == InvalidAttrNumber)
			elog(ERROR, "orch.%s has no column %s", src->table, src->cols[c]);
	}
	index_close(idx, NoLock);
	table_close(rel, NoLock);

	if (!src->registered)
	{
		src->next = prepared_sources;
		prepared_sources = src;
		src->registered = true;
	}
	src->ready = true;
}

/* Does the row in slot still have the key? */
static bool
key_matches(const OrchRowSource *src, TupleTableSlot *slot, const Datum *keys)
{
	for (int k = 0; k < src->nkeys; k++)
	{
		bool		isnull;
		Datum		v = slot_getattr(slot, src->key_attnum[k], &isnull);

		if (isnull ||
			!DatumGetBool(OidFunctionCall2Coll(src->key_eq[k], src->key_collation[k], v, keys[k])))
			return false;
	}
	return true;
}

/*
 * Lock the row in slot FOR UPDATE.  Returns false when there is no row to
 * lock any more (deleted, or in READ COMMITTED updated to a version without
 * the key); the slot then holds the newest version when it was updated.
 */
static bool
lock_row(const OrchRowSource *src, Relation rel, Snapshot snap, TupleTableSlot *slot,
		 const Datum *keys)
{
	TM_FailureData tmfd;
	ItemPointerData tid = slot->tts_tid;
	uint8		flags = IsolationUsesXactSnapshot() ? 0 : TUPLE_LOCK_FLAG_FIND_LAST_VERSION;
	TM_Result	r;

	r = table_tuple_lock(rel, &tid, snap, slot, GetCurrentCommandId(true), LockTupleExclusive,
						 LockWaitBlock, flags, &tmfd);
	switch (r)
	{
		case TM_Ok:
			/* a newer version: is it still the row asked for? */
			return !tmfd.traversed || key_matches(src, slot, keys);
		case TM_SelfModified:
			/* changed by a later command of this transaction: as if gone */
			return false;
		case TM_Updated:
		case TM_Deleted:
			if (IsolationUsesXactSnapshot())
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("could not serialize access due to concurrent update")));
			if (r == TM_Updated)
				elog(ERROR, "unexpected result locking a row of orch.%s: %d", src->table, (int) r);
			return false;
		case TM_Invisible:
			elog(ERROR, "attempted to lock an invisible row of orch.%s", src->table);
			break;
		default:
			elog(ERROR, "unexpected result locking a row of orch.%s: %d", src->table, (int) r);
	}
	return false;
}

/*
 * The row of orch.<src->table> whose key (src->index's columns) equals
 * keys, as a statement of its own would see it (in READ COMMITTED a new
 * snapshot, with this transaction's earlier commands), locked FOR UPDATE
 * when lock is set.  Returns false when there is none; else values[c] and
 * nulls[c] hold src->cols[c], copied into the current memory context,
 * values stored out of line fetched.
 */
bool
orch_row_fetch(OrchRowSource *src, const Datum *keys, bool lock, Datum *values, bool *nulls)
{
	Relation	rel;
	Relation	idx;
	ScanKeyData sk[ORCH_ROW_MAX_KEYS];
	IndexScanDesc scan;
	TupleTableSlot *slot;
	Snapshot	snap;
	LOCKMODE	mode = lock ? RowShareLock : AccessShareLock;
	bool		found = false;

	/* as the executor refuses SELECT ... FOR UPDATE (a standby's included) */
	if (lock)
		PreventCommandIfReadOnly("SELECT FOR UPDATE");

	/*
	 * As SPI does for a statement that may write: this transaction's changes
	 * so far are seen, and their invalidations processed.
	 */
	CommandCounterIncrement();

	/*
	 * Lock the table and the index, then trust what was looked up of them:
	 * taking a lock processes the invalidations of DDL that committed since,
	 * which may have made it stale (a column's type changed, the index built
	 * anew).  Then look it up again, and lock what it names now.
	 */
	for (;;)
	{
		if (!src->ready)
			source_prepare(src);
		LockRelationOid(src->relid, mode);
		LockRelationOid(src->indexid, AccessShareLock);
		if (src->ready)
			break;
		UnlockRelationOid(src->indexid, AccessShareLock);
		UnlockRelationOid(src->relid, mode);
	}
	rel = table_open(src->relid, NoLock);
	idx = index_open(src->indexid, NoLock);
	for (int k = 0; k < src->nkeys; k++)
		ScanKeyEntryInitialize(&sk[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   src->key_collation[k], src->key_eq[k], keys[k]);

	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();
	snap = GetActiveSnapshot();

	slot = table_slot_create(rel, NULL);
	scan = index_beginscan(rel, idx, snap, src->nkeys, 0);
	index_rescan(scan, sk, src->nkeys, NULL, 0);
	/* a unique key: the snapshot sees at most one row with it */
	if (index_getnext_slot(scan, ForwardScanDirection, slot))
		found = !lock || lock_row(src, rel, snap, slot, keys);

	if (found)
	{
		slot_getallattrs(slot);
		for (int c = 0; c < src->ncols; c++)
		{
			int			a = src->attnum[c] - 1;
			Datum		v = slot->tts_values[a];

			nulls[c] = slot->tts_isnull[a];
			if (nulls[c])
				values[c] = (Datum) 0;
			else if (src->typlen[c] == -1 && VARATT_IS_EXTERNAL(DatumGetPointer(v)))
				values[c] = PointerGetDatum(detoast_external_attr((struct varlena *) DatumGetPointer(v)));
			else
				values[c] = datumCopy(v, src->typbyval[c], src->typlen[c]);
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	PopActiveSnapshot();
	index_close(idx, NoLock);
	table_close(rel, NoLock);
	return found;
}
