/*-------------------------------------------------------------------------
 * rowwrite.c
 *	  Updates of orchestrator rows without the executor.
 *
 *	  A claim leases each task it locked with one UPDATE of orch.steps.  As
 *	  an SQL statement that is a plan set up and torn down per claim (the
 *	  step, its run and its definition joined, seven indexes opened, their
 *	  predicates prepared, transition tables filled for the audit trigger):
 *	  for one task, more than the rest of the claim together.  Here the row
 *	  the claim holds locked is updated through the table's access method,
 *	  its index entries are made as the executor makes them, and its audit
 *	  event is recorded as the table's orch._audit() trigger records it.
 *
 *	  Only where that is all the executor would do: a table with triggers
 *	  of its own (other than orch._audit() and foreign keys' triggers),
 *	  rules, row-level security, check constraints or generated columns is
 *	  written by the caller's SQL statement instead (orch_writer_begin
 *	  returns false).  The caller writes no key that a foreign key refers
 *	  to or from, and runs as the table's owner (a SECURITY DEFINER
 *	  function of the extension), as its SQL statement would.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_trigger.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "orchestrator.h"
#include "audit.h"

/*
 * Would the executor fire anything but orch._audit() and foreign keys'
 * triggers for op on rel, or do more than write the row and its index
 * entries (rules, policies, check constraints, generated columns)?
 */
static bool
needs_executor(Relation rel, CmdType op)
{
	TriggerDesc *td = rel->trigdesc;
	TupleConstr *constr = rel->rd_att->constr;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rules != NULL ||
		rel->rd_rel->relrowsecurity)
		return true;
	if (constr != NULL && (constr->num_check > 0 || constr->has_generated_stored))
		return true;
	if (td == NULL)
		return false;
	for (int i = 0; i < td->numtriggers; i++)
	{
		const Trigger *t = &td->triggers[i];
		bool		for_op = op == CMD_UPDATE ? TRIGGER_FOR_UPDATE(t->tgtype) :
			op == CMD_INSERT ? TRIGGER_FOR_INSERT(t->tgtype) : TRIGGER_FOR_DELETE(t->tgtype);

		if (!for_op)
			continue;
		if (t->tgisinternal && RI_FKey_trigger_type(t->tgfoid) != RI_TRIGGER_NONE)
			continue;
		if (!TRIGGER_FOR_ROW(t->tgtype) && TRIGGER_FOR_AFTER(t->tgtype) &&
			orch_audit_is_trigger_fn(t->tgfoid))
			continue;
		return true;
	}
	return false;
}

/* Would orch_writer_begin refuse relid for op (see needs_executor)? */
bool
orch_writer_refuses(Oid relid, CmdType op)
{
	Relation	rel = table_open(relid, AccessShareLock);
	bool		refuses = needs_executor(rel, op);

	table_close(rel, AccessShareLock);
	return refuses;
}

/*
 * Get ready to write rows of relid (op: CMD_UPDATE), the columns written
 * being those set in written (by attribute number - 1).  False when the
 * table needs the executor (see above): nothing is open then, and the
 * caller writes with SQL.
 */
bool
orch_writer_begin(OrchRowWriter *w, Oid relid, CmdType op, const bool *written)
{
	RangeTblEntry *rte;
	TupleDesc	desc;

	Assert(op == CMD_UPDATE);
	memset(w, 0, sizeof(*w));
	w->rel = table_open(relid, RowExclusiveLock);
	if (needs_executor(w->rel, op))
	{
		table_close(w->rel, NoLock);
		w->rel = NULL;
		return false;
	}
	CheckCmdReplicaIdentity(w->rel, op);
	desc = RelationGetDescr(w->rel);

	/*
	 * A range table of the one relation, with the columns written: the
	 * index AMs are told which entries an update leaves unchanged, as for
	 * the executor's UPDATE.
	 */
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = relid;
	rte->relkind = w->rel->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	for (int a = 0; a < desc->natts; a++)
		if (written[a])
			rte->updatedCols = bms_add_member(rte->updatedCols,
											  a + 1 - FirstLowInvalidHeapAttributeNumber);
	w->estate = CreateExecutorState();
	w->written = palloc(sizeof(bool) * desc->natts);
	memcpy(w->written, written, sizeof(bool) * desc->natts);
	ExecInitRangeTable(w->estate, list_make1(rte));
	w->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(w->rri, w->rel, 1, NULL, 0);
	ExecOpenIndices(w->rri, false);
	w->before = table_slot_create(w->rel, &w->estate->es_tupleTable);
	w->after = ExecInitExtraTupleSlot(w->estate, desc, &TTSOpsVirtual);
	w->audit = orch_audit_rows_begin(w->rel, op);
	return true;
}

/*
 * The row at tid, which this transaction holds locked in its newest
 * version, into w->before; the caller then computes the new values from
 * it.
 */
TupleTableSlot *
orch_writer_fetch(OrchRowWriter *w, ItemPointer tid)
{
	if (!table_tuple_fetch_row_version(w->rel, tid, SnapshotAny, w->before))
		elog(ERROR, "could not fetch a locked row of %s", RelationGetRelationName(w->rel));
	slot_getallattrs(w->before);
	return w->before;
}

/*
 * Update the row in w->before: the columns written take values and nulls
 * (by attribute number - 1), the others stay.  The new row is in w->after
 * afterwards.
 */
void
orch_writer_update(OrchRowWriter *w, const Datum *values, const bool *nulls)
{
	TupleDesc	desc = RelationGetDescr(w->rel);
	ItemPointerData tid = w->before->tts_tid;
	TM_FailureData tmfd;
	LockTupleMode lockmode;
	bool		update_indexes;
	TM_Result	r;

	ExecClearTuple(w->after);
	for (int a = 0; a < desc->natts; a++)
	{
		bool		isnull = w->written[a] ? nulls[a] : w->before->tts_isnull[a];

		if (isnull && TupleDescAttr(desc, a)->attnotnull)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of relation \"%s\" violates not-null constraint",
							NameStr(TupleDescAttr(desc, a)->attname),
							RelationGetRelationName(w->rel))));
		w->after->tts_isnull[a] = isnull;
		w->after->tts_values[a] = isnull ? (Datum) 0 :
			w->written[a] ? values[a] : w->before->tts_values[a];
	}
	ExecStoreVirtualTuple(w->after);

	r = table_tuple_update(w->rel, &tid, w->after, GetCurrentCommandId(true), InvalidSnapshot,
						   InvalidSnapshot,
						   true, &tmfd, &lockmode, &update_indexes);
	if (r != TM_Ok)
		elog(ERROR, "could not update a locked row of %s: %d", RelationGetRelationName(w->rel),
			 (int) r);
	if (w->rri->ri_NumIndices > 0 && update_indexes)
		list_free(ExecInsertIndexTuples(w->rri, w->after, w->estate, true, false, NULL, NIL));
	ResetPerTupleExprContext(w->estate);
	if (w->audit != NULL)
		orch_audit_rows_add(w->audit, w->before, w->after);
}

/*
 * Done: the audit events recorded, everything closed, and the rows written
 * made visible to the transaction's next commands.
 */
void
orch_writer_end(OrchRowWriter *w)
{
	if (w->audit != NULL)
		orch_audit_rows_end(w->audit);
	ExecCloseIndices(w->rri);
	ExecResetTupleTable(w->estate->es_tupleTable, false);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
	memset(w, 0, sizeof(*w));
	CommandCounterIncrement();
}
