/*-------------------------------------------------------------------------
 * rowfetch.c
 *	  Rows of orchestrator tables by index, without the executor.
 *
 *	  A worker's verdict on a task reads four rows, each by a unique key:
 *	  the step named by its lease token, the step's run (both locked FOR UPDATE),
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
 *	  A claim locks the next waiting tasks of a queue the same way
 *	  (orch_pick_tasks): a scan of the queue's index, skipping the tasks
 *	  other transactions hold, as SELECT ... FOR UPDATE SKIP LOCKED would.
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
#include "catalog/pg_enum.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/sinval.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "orchestrator.h"

/* The OID of orch.<name>, a table or an index of the extension's. */
Oid
orch_relid(const char *name)
{
	return orch_relid_extended(name, false);
}

/* The same, or InvalidOid if missing_ok and it (or the schema) is gone. */
Oid
orch_relid_extended(const char *name, bool missing_ok)
{
	Oid			nsp = get_namespace_oid("orch", missing_ok);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid(name, nsp) : InvalidOid;

	if (!OidIsValid(relid) && !missing_ok)
		elog(ERROR, "orch.%s is missing", name);
	return relid;
}

/* every source prepared in this session, for the invalidation callback */
static OrchRowSource *prepared_sources = NULL;
static bool callback_registered = false;

/*
 * What orch_pick_tasks looks up once per session: orch.steps and its
 * queue index, orch.runs and its primary key, the columns read, the
 * functions of the scan keys, the enum values compared.
 */
enum
{
	PICK_STEPS, PICK_QUEUE_INDEX, PICK_RUNS, PICK_RUNS_INDEX, PICK_NRELS
};
static const char *const pick_names[PICK_NRELS] = {
	"steps", "steps_task_queue", "runs", "runs_pkey"
};
/* the steps are locked as SELECT ... FOR UPDATE locks them */
static const LOCKMODE pick_modes[PICK_NRELS] = {
	RowShareLock, AccessShareLock, AccessShareLock, AccessShareLock
};

typedef struct PickSource
{
	bool		ready;
	Oid			rels[PICK_NRELS];	/* of pick_names */
	AttrNumber	step_id;
	AttrNumber	run_id;
	AttrNumber	status;
	AttrNumber	priority;
	AttrNumber	run_status;
	Oid			queue_eq;		/* the index's first column: = */
	Oid			queue_collation;
	Oid			key_cmp[2];		/* its second and third: their comparison */
	Oid			run_eq;
	Oid			waiting;		/* orch.step_status 'waiting' */
	Oid			run_pending;	/* orch.run_status 'pending' and 'running' */
	Oid			run_running;
} PickSource;

static PickSource pick;

/* Is relid one of the n relations (InvalidOid: all of them)? */
static bool
rel_among(Oid relid, int n, const Oid *rels)
{
	for (int i = 0; i < n; i++)
		if (!OidIsValid(relid) || relid == rels[i])
			return true;
	return false;
}

static void
sources_invalidate(Datum arg, Oid relid)
{
	for (OrchRowSource *s = prepared_sources; s != NULL; s = s->next)
		if (rel_among(relid, 2, s->rels))
			s->ready = false;
	if (rel_among(relid, PICK_NRELS, pick.rels))
		pick.ready = false;
}

static void
register_callback(void)
{
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(sources_invalidate, (Datum) 0);
		callback_registered = true;
	}
}

static void
lock_relations(int n, const Oid *rels, const LOCKMODE *modes)
{
	for (int i = 0; i < n; i++)
		LockRelationOid(rels[i], modes[i]);
}

static void
unlock_relations(int n, const Oid *rels, const LOCKMODE *modes)
{
	for (int i = n - 1; i >= 0; i--)
		UnlockRelationOid(rels[i], modes[i]);
}

/*
 * Look the names up and lock what they name (until the transaction ends, as
 * the executor would), into rels.  DDL that committed while we waited for a
 * lock (an index built anew) may have given a name another OID: when any
 * invalidation came meanwhile, look the names up again.
 */
static void
lock_by_name(int n, const char *const *names, const LOCKMODE *modes, Oid *rels)
{
	for (;;)
	{
		uint64		invals = SharedInvalidMessageCounter;

		for (int i = 0; i < n; i++)
			rels[i] = orch_relid(names[i]);
		lock_relations(n, rels, modes);
		if (invals == SharedInvalidMessageCounter)
			return;
		unlock_relations(n, rels, modes);
	}
}

/*
 * Lock the relations of what a session looked up (rels, ready), then trust
 * it: taking a lock processes the invalidations of DDL that committed
 * since, which may have made it stale (*ready cleared: a column's type
 * changed, the index built anew).  Then look it up again (look_up(arg)),
 * and lock what it names now.
 */
static void
lock_looked_up(const bool *ready, void (*look_up) (void *), void *arg,
			   int n, const Oid *rels, const LOCKMODE *modes)
{
	for (;;)
	{
		if (!*ready)
			look_up(arg);
		lock_relations(n, rels, modes);
		if (*ready)
			return;
		unlock_relations(n, rels, modes);
	}
}

/*
 * An index being built or dropped concurrently, or left invalid by a build
 * that failed, does not have every row; one whose uniqueness is deferred
 * may have two for a key.
 */
static void
check_index_usable(Relation idx, const char *name)
{
	if (!idx->rd_index->indisvalid || !idx->rd_index->indisready ||
		!idx->rd_index->indislive || !idx->rd_index->indimmediate)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("index orch.%s is not usable", name),
				 errdetail("It is invalid, not ready, being dropped, or its uniqueness is deferred."),
				 errhint("Rebuild it with REINDEX INDEX orch.%s.", name)));
}

/* The function of idx's operator of strategy for its column col (from 0). */
static Oid
index_operator(Relation idx, int col, int16 strategy, const char *name)
{
	Oid			opno = get_opfamily_member(idx->rd_opfamily[col], idx->rd_opcintype[col],
										   idx->rd_opcintype[col], strategy);

	if (!OidIsValid(opno))
		elog(ERROR, "no operator of strategy %d for column %d of orch.%s", strategy, col + 1, name);
	return get_opcode(opno);
}

/*
 * Resolve what an OrchRowSource names: the table, its key's index, columns,
 * key functions.
 */
static void
source_prepare(void *arg)
{
	OrchRowSource *src = arg;
	const char *const names[2] = {src->table, src->index};
	static const LOCKMODE modes[2] = {AccessShareLock, AccessShareLock};
	Relation	rel;
	Relation	idx;
	TupleDesc	desc;

	register_callback();
	src->ready = false;
	Assert(src->nkeys >= 1 && src->nkeys <= ORCH_ROW_MAX_KEYS);
	Assert(src->ncols >= 0 && src->ncols <= ORCH_ROW_MAX_COLS);

	lock_by_name(2, names, modes, src->rels);
	rel = table_open(src->rels[0], NoLock);
	idx = index_open(src->rels[1], NoLock);
	if (idx->rd_index->indrelid != src->rels[0] || !idx->rd_index->indisunique ||
		idx->rd_rel->relam != BTREE_AM_OID ||
		IndexRelationGetNumberOfKeyAttributes(idx) != src->nkeys)
		elog(ERROR, "orch.%s is not a unique btree index of %d columns on orch.%s",
			 src->index, src->nkeys, src->table);

	check_index_usable(idx, src->index);
	for (int k = 0; k < src->nkeys; k++)
	{
		src->key_eq[k] = index_operator(idx, k, BTEqualStrategyNumber, src->index);
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

/*
 * The attribute numbers of src's columns (src->cols), looked up once per
 * session as for orch_row_fetch; the table and its index are locked as
 * orch_row_fetch locks them, without a lock on rows.
 */
const int16 *
orch_row_source_attnums(OrchRowSource *src)
{
	static const LOCKMODE modes[2] = {AccessShareLock, AccessShareLock};

	lock_looked_up(&src->ready, source_prepare, src, 2, src->rels, modes);
	return src->attnum;
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
 * A row to lock was changed since the snapshot: in REPEATABLE READ and
 * SERIALIZABLE a serialization failure, as the executor raises it.
 */
static void
fail_if_transaction_snapshot(void)
{
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to concurrent update")));
}

/* Has the row in slot the value m asks for (no m: any row)? */
static bool
match(const OrchRowSource *src, TupleTableSlot *slot, const OrchRowMatch *m)
{
	bool		isnull;
	Datum		v;

	if (m == NULL)
		return true;
	v = slot_getattr(slot, src->attnum[m->col], &isnull);
	return !isnull && datumIsEqual(v, m->value, src->typbyval[m->col], src->typlen[m->col]);
}

/*
 * Lock the row in slot FOR UPDATE.  Returns false when there is no row to
 * lock any more (deleted, or in READ COMMITTED updated to a version without
 * the key); the slot then holds the newest version when it was updated.
 */
static bool
lock_row(const OrchRowSource *src, Relation rel, Snapshot snap, TupleTableSlot *slot,
		 const Datum *keys, const OrchRowMatch *m)
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
			return !tmfd.traversed || (key_matches(src, slot, keys) && match(src, slot, m));
		case TM_SelfModified:
			/* changed by a later command of this transaction: as if gone */
			return false;
		case TM_Updated:
		case TM_Deleted:
			fail_if_transaction_snapshot();
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
	return orch_row_fetch_match(src, keys, NULL, lock, values, nulls);
}

static bool row_find(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m, bool lock,
					 TupleTableSlot *into, Datum *values, bool *nulls);

/*
 * orch_row_fetch, for the row only if its column src->cols[m->col] holds
 * m->value (no m: any row).  The value is checked before the row is locked,
 * so a row without it is not locked, and again in the newest version
 * locked.
 */
bool
orch_row_fetch_match(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m, bool lock,
					 Datum *values, bool *nulls)
{
	return row_find(src, keys, m, lock, NULL, values, nulls);
}

/*
 * The row orch_row_fetch_match would lock (m NULL: any row with the key),
 * left in slot (of the table's slot type), its newest version: as an
 * UPDATE by the key, with m as a condition of its WHERE clause, finds and
 * locks it.
 */
bool
orch_row_lock(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m, TupleTableSlot *slot)
{
	return row_find(src, keys, m, true, slot, NULL, NULL);
}

/*
 * orch_row_fetch_match's work: the row found is left in into if given,
 * else its columns copied into values and nulls.
 */
static bool
row_find(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m, bool lock,
		 TupleTableSlot *into, Datum *values, bool *nulls)
{
	Relation	rel;
	Relation	idx;
	ScanKeyData sk[ORCH_ROW_MAX_KEYS];
	IndexScanDesc scan;
	TupleTableSlot *slot;
	Snapshot	snap;
	const LOCKMODE modes[2] = {lock ? RowShareLock : AccessShareLock, AccessShareLock};
	bool		found = false;

	/* as the executor refuses SELECT ... FOR UPDATE (a standby's included) */
	if (lock)
		PreventCommandIfReadOnly("SELECT FOR UPDATE");

	/*
	 * As SPI does for a statement that may write: this transaction's changes
	 * so far are seen, and their invalidations processed.
	 */
	CommandCounterIncrement();

	lock_looked_up(&src->ready, source_prepare, src, 2, src->rels, modes);
	rel = table_open(src->rels[0], NoLock);
	idx = index_open(src->rels[1], NoLock);
	for (int k = 0; k < src->nkeys; k++)
		ScanKeyEntryInitialize(&sk[k], 0, k + 1, BTEqualStrategyNumber, InvalidOid,
							   src->key_collation[k], src->key_eq[k], keys[k]);

	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();
	snap = GetActiveSnapshot();

	slot = into != NULL ? into : table_slot_create(rel, NULL);
	scan = index_beginscan(rel, idx, snap, src->nkeys, 0);
	index_rescan(scan, sk, src->nkeys, NULL, 0);
	/* a unique key: the snapshot sees at most one row with it */
	if (index_getnext_slot(scan, ForwardScanDirection, slot) && match(src, slot, m))
		found = !lock || lock_row(src, rel, snap, slot, keys, m);

	if (found && into == NULL)
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
	if (into == NULL)
		ExecDropSingleTupleTableSlot(slot);
	PopActiveSnapshot();
	index_close(idx, NoLock);
	table_close(rel, NoLock);
	return found;
}

/* ------------------------------------------------------------------------
 * The outputs of a run's steps
 * ------------------------------------------------------------------------ */

/*
 * The columns orch_run_outputs reads, by the index on (run_id, name) whose
 * first column its scan keys on.
 */
enum
{
	RO_NAME, RO_STATUS, RO_OUTPUT, RO_NCOLS
};
static OrchRowSource outputs_source = {
	"steps", "steps_run_id_name_key", 2, RO_NCOLS, {"name", "status", "output"}
};

/* Add a jsonb document as the value of the object being built. */
void
orch_push_jsonb(JsonbParseState **ps, Jsonb *jb)
{
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (JB_ROOT_IS_SCALAR(jb))
	{
		(void) JsonbIteratorNext(&it, &v, true);	/* the array around it */
		(void) JsonbIteratorNext(&it, &v, true);
		(void) pushJsonbValue(ps, WJB_VALUE, &v);
		return;
	}
	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		if (tok == WJB_BEGIN_ARRAY || tok == WJB_BEGIN_OBJECT ||
			tok == WJB_END_ARRAY || tok == WJB_END_OBJECT)
			(void) pushJsonbValue(ps, tok, NULL);
		else
			(void) pushJsonbValue(ps, tok, &v);
	}
}

/*
 * The outputs of the run's succeeded steps by name, as a statement of its
 * own would see them: the jsonb object ORCH_STEP_OUTPUTS_SQL aggregates
 * from the same rows.
 */
Datum
orch_run_outputs(Datum run_id)
{
	const int16 *att;
	Relation	steps;
	Relation	idx;
	ScanKeyData key;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	JsonbParseState *ps = NULL;
	JsonbValue *result;
	Oid			succeeded;

	CommandCounterIncrement();
	att = orch_row_source_attnums(&outputs_source);
	steps = table_open(outputs_source.rels[0], NoLock);
	idx = index_open(outputs_source.rels[1], NoLock);
	succeeded = orch_enum_oid(TupleDescAttr(RelationGetDescr(steps), att[RO_STATUS] - 1)->atttypid,
							  "succeeded");
	ScanKeyEntryInitialize(&key, 0, 1, BTEqualStrategyNumber, InvalidOid,
						   outputs_source.key_collation[0], outputs_source.key_eq[0], run_id);
	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();

	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	slot = table_slot_create(steps, NULL);
	scan = index_beginscan(steps, idx, GetActiveSnapshot(), 1, 0);
	index_rescan(scan, &key, 1, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		status = slot_getattr(slot, att[RO_STATUS], &isnull);
		text	   *name;
		Datum		output;
		JsonbValue	k;

		if (isnull || DatumGetObjectId(status) != succeeded)
			continue;
		/* copies: the values pushed are pointed to until the end, past this row */
		name = DatumGetTextPCopy(slot_getattr(slot, att[RO_NAME], &isnull));
		k.type = jbvString;
		k.val.string.val = VARDATA_ANY(name);
		k.val.string.len = VARSIZE_ANY_EXHDR(name);
		(void) pushJsonbValue(&ps, WJB_KEY, &k);
		output = slot_getattr(slot, att[RO_OUTPUT], &isnull);
		if (isnull)
		{
			JsonbValue	null = {.type = jbvNull};

			(void) pushJsonbValue(&ps, WJB_VALUE, &null);
		}
		else
			orch_push_jsonb(&ps, DatumGetJsonbPCopy(output));
	}
	result = pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	PopActiveSnapshot();
	index_close(idx, NoLock);
	table_close(steps, NoLock);
	return JsonbPGetDatum(JsonbValueToJsonb(result));
}

/* ------------------------------------------------------------------------
 * The next waiting tasks of a queue
 * ------------------------------------------------------------------------ */

/* orch.<rel>'s column name, which must exist */
static AttrNumber
column_of(Oid relid, const char *rel, const char *name)
{
	AttrNumber	a = get_attnum(relid, name);

	if (a == InvalidAttrNumber)
		elog(ERROR, "orch.%s has no column %s", rel, name);
	return a;
}

/* The OID of the label of enum type typid, which must exist. */
Oid
orch_enum_oid(Oid typid, const char *label)
{
	Oid			oid = GetSysCacheOid2(ENUMTYPOIDNAME, Anum_pg_enum_oid,
									  ObjectIdGetDatum(typid), CStringGetDatum(label));

	if (!OidIsValid(oid))
		elog(ERROR, "type %s has no value %s", format_type_be(typid), label);
	return oid;
}

/* The OID of a label of the enum type of orch.<relid>'s column att. */
static Oid
enum_value(Oid relid, AttrNumber att, const char *label)
{
	return orch_enum_oid(get_atttype(relid, att), label);
}

/* Look up what pick names, once its relations are locked by OID. */
static void
pick_prepare(void *arg)
{
	Oid			steps;
	Oid			runs;
	Relation	idx;

	register_callback();
	pick.ready = false;
	lock_by_name(PICK_NRELS, pick_names, pick_modes, pick.rels);
	steps = pick.rels[PICK_STEPS];
	runs = pick.rels[PICK_RUNS];

	pick.step_id = column_of(steps, "steps", "step_id");
	pick.run_id = column_of(steps, "steps", "run_id");
	pick.status = column_of(steps, "steps", "status");
	pick.priority = column_of(steps, "steps", "priority");
	pick.run_status = column_of(runs, "runs", "status");
	pick.waiting = enum_value(steps, pick.status, "waiting");
	pick.run_pending = enum_value(runs, pick.run_status, "pending");
	pick.run_running = enum_value(runs, pick.run_status, "running");

	/* queue, - priority::bigint, step_id */
	idx = index_open(pick.rels[PICK_QUEUE_INDEX], NoLock);
	if (idx->rd_index->indrelid != steps || idx->rd_rel->relam != BTREE_AM_OID ||
		IndexRelationGetNumberOfKeyAttributes(idx) != 3 ||
		idx->rd_index->indkey.values[0] != column_of(steps, "steps", "queue") ||
		idx->rd_index->indkey.values[2] != pick.step_id ||
		idx->rd_opcintype[1] != INT8OID || idx->rd_opcintype[2] != INT8OID)
		elog(ERROR, "orch.steps_task_queue is not a btree index on (queue, - priority::bigint, step_id)");
	check_index_usable(idx, "steps_task_queue");
	pick.queue_eq = index_operator(idx, 0, BTEqualStrategyNumber, "steps_task_queue");
	pick.queue_collation = idx->rd_indcollation[0];
	/* a row comparison's members take the three-way comparison, as the executor's do */
	for (int c = 0; c < 2; c++)
	{
		pick.key_cmp[c] = get_opfamily_proc(idx->rd_opfamily[c + 1], INT8OID, INT8OID,
											BTORDER_PROC);
		if (!OidIsValid(pick.key_cmp[c]))
			elog(ERROR, "no comparison function for column %d of orch.steps_task_queue", c + 2);
	}
	index_close(idx, NoLock);

	idx = index_open(pick.rels[PICK_RUNS_INDEX], NoLock);
	if (idx->rd_index->indrelid != runs || idx->rd_rel->relam != BTREE_AM_OID ||
		IndexRelationGetNumberOfKeyAttributes(idx) != 1 ||
		idx->rd_index->indkey.values[0] != column_of(runs, "runs", "run_id"))
		elog(ERROR, "orch.runs_pkey is not a btree index on (run_id)");
	check_index_usable(idx, "runs_pkey");
	pick.run_eq = index_operator(idx, 0, BTEqualStrategyNumber, "runs_pkey");
	index_close(idx, NoLock);

	pick.ready = true;
}

/* Is the run pending or running, as snap sees it? */
static bool
run_active(IndexScanDesc scan, TupleTableSlot *slot, Datum run_id)
{
	ScanKeyData key;
	bool		isnull;
	Datum		status;

	ScanKeyEntryInitialize(&key, 0, 1, BTEqualStrategyNumber, InvalidOid, InvalidOid,
						   pick.run_eq, run_id);
	index_rescan(scan, &key, 1, NULL, 0);
	if (!index_getnext_slot(scan, ForwardScanDirection, slot))
		return false;
	status = slot_getattr(slot, pick.run_status, &isnull);
	return !isnull && (DatumGetObjectId(status) == pick.run_pending ||
					   DatumGetObjectId(status) == pick.run_running);
}

/*
 * Lock up to max waiting tasks of the queue, in claim order (its index
 * steps_task_queue: queue, negated priority, step), of runs that are
 * pending or running, as SELECT ... FOR UPDATE SKIP LOCKED would; when
 * after is given, only tasks whose (negated priority, step) comes after it
 * (a row comparison on the index, which starts the scan there), and none
 * of the ntaken tasks taken (those this claim locked already, whose lock
 * would be granted to us again).  Returns how many were locked,
 * their keys in out, in that order.
 *
 * A task another transaction holds locked, or changed since the snapshot
 * (a claim that committed meanwhile), is passed over and *skipped set: the
 * queue may hold tasks a claim could take a moment later.  (In READ
 * COMMITTED, SKIP LOCKED would lock a changed row's newest version and
 * check it again; such a row has, but for a pause or a cancellation,
 * been claimed.)  In REPEATABLE READ and SERIALIZABLE a changed row is a
 * serialization failure, as it is for FOR UPDATE.
 *
 * The rows are then updated by their tids (out[].tid), through the table's
 * access method where it can be (rowwrite.c), else by an UPDATE statement:
 * a claim as one statement spent more on setting up its plan (a join, row
 * locks, a limit, an initplan) than on reading the queue.
 */
static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

int
orch_pick_tasks(Datum queue, const int64 *after, const OrchPickedTask *taken, int ntaken,
				int max, OrchPickedTask *out, bool *skipped)
{
	Relation	steps;
	Relation	qidx;
	Relation	runs;
	Relation	ridx;
	ScanKeyData keys[2];
	ScanKeyData row[2];
	int			nkeys = 1;
	IndexScanDesc scan;
	IndexScanDesc run_scan;
	TupleTableSlot *slot;
	TupleTableSlot *lock_slot;
	TupleTableSlot *run_slot;
	Snapshot	snap;
	CommandId	cid;
	int64	   *taken_ids = NULL;
	int			n = 0;

	*skipped = false;
	if (ntaken > 0)
	{
		taken_ids = palloc(sizeof(int64) * ntaken);
		for (int i = 0; i < ntaken; i++)
			taken_ids[i] = taken[i].step_id;
		qsort(taken_ids, ntaken, sizeof(int64), int64_cmp);
	}
	/* it locks rows, then updates them */
	PreventCommandIfReadOnly("SELECT FOR UPDATE");
	CommandCounterIncrement();
	lock_looked_up(&pick.ready, pick_prepare, NULL, PICK_NRELS, pick.rels, pick_modes);
	steps = table_open(pick.rels[PICK_STEPS], NoLock);
	qidx = index_open(pick.rels[PICK_QUEUE_INDEX], NoLock);
	runs = table_open(pick.rels[PICK_RUNS], NoLock);
	ridx = index_open(pick.rels[PICK_RUNS_INDEX], NoLock);

	ScanKeyEntryInitialize(&keys[0], 0, 1, BTEqualStrategyNumber, InvalidOid,
						   pick.queue_collation, pick.queue_eq, queue);
	if (after != NULL)
	{
		/* (- priority::bigint, step_id) > (after[0], after[1]) */
		ScanKeyEntryInitialize(&row[0], SK_ROW_MEMBER, 2, BTGreaterStrategyNumber, INT8OID,
							   InvalidOid, pick.key_cmp[0], Int64GetDatum(after[0]));
		ScanKeyEntryInitialize(&row[1], SK_ROW_MEMBER | SK_ROW_END, 3, BTGreaterStrategyNumber,
							   INT8OID, InvalidOid, pick.key_cmp[1], Int64GetDatum(after[1]));
		/* as the executor builds one: a header has no function */
		MemSet(&keys[1], 0, sizeof(ScanKeyData));
		keys[1].sk_flags = SK_ROW_HEADER;
		keys[1].sk_attno = 2;
		keys[1].sk_strategy = BTGreaterStrategyNumber;
		keys[1].sk_argument = PointerGetDatum(row);
		nkeys = 2;
	}

	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();
	snap = GetActiveSnapshot();
	cid = GetCurrentCommandId(true);

	slot = table_slot_create(steps, NULL);
	lock_slot = table_slot_create(steps, NULL);
	run_slot = table_slot_create(runs, NULL);
	scan = index_beginscan(steps, qidx, snap, nkeys, 0);
	index_rescan(scan, keys, nkeys, NULL, 0);
	run_scan = index_beginscan(runs, ridx, snap, 1, 0);

	while (n < max && index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		status = slot_getattr(slot, pick.status, &isnull);
		ItemPointerData tid = slot->tts_tid;
		TM_FailureData tmfd;
		TM_Result	r;
		int64		step_id;

		CHECK_FOR_INTERRUPTS();

		/*
		 * The version the snapshot sees is waiting: a change of the status
		 * (in the index's predicate) makes a new index entry, and the
		 * versions of one entry all have the status it was made with.
		 */
		if (isnull || DatumGetObjectId(status) != pick.waiting)
			continue;
		step_id = DatumGetInt64(slot_getattr(slot, pick.step_id, &isnull));
		/* locked by this claim already: a lock we hold is granted again */
		if (ntaken > 0 && bsearch(&step_id, taken_ids, ntaken, sizeof(int64), int64_cmp) != NULL)
			continue;
		if (!run_active(run_scan, run_slot, slot_getattr(slot, pick.run_id, &isnull)))
			continue;

		r = table_tuple_lock(steps, &tid, snap, lock_slot, cid, LockTupleExclusive,
							 LockWaitSkip, 0, &tmfd);
		switch (r)
		{
			case TM_Ok:
				out[n].step_id = step_id;
				out[n].tid = tid;
				out[n].neg_priority = -(int64) DatumGetInt32(slot_getattr(slot, pick.priority,
																		  &isnull));
				n++;
				break;
			case TM_WouldBlock:
				*skipped = true;
				break;
			case TM_Updated:
			case TM_Deleted:
				fail_if_transaction_snapshot();
				*skipped = true;
				break;
			case TM_SelfModified:
				/* changed by a later command of this transaction: not for us */
				break;
			default:
				elog(ERROR, "unexpected result locking a task of orch.steps: %d", (int) r);
		}
	}

	index_endscan(run_scan);
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(run_slot);
	ExecDropSingleTupleTableSlot(lock_slot);
	ExecDropSingleTupleTableSlot(slot);
	PopActiveSnapshot();
	index_close(ridx, NoLock);
	table_close(runs, NoLock);
	index_close(qidx, NoLock);
	table_close(steps, NoLock);
	if (taken_ids != NULL)
		pfree(taken_ids);
	return n;
}
