/*-------------------------------------------------------------------------
 * rowwrite.c
 *	  Writes of orchestrator rows without the executor.
 *
 *	  A claim leases each task it locked with one UPDATE of orch.steps, and a
 *	  verdict writes three rows (its step, its attempt, its run's counter),
 *	  each with a statement of its own.  As SQL each is a plan set up and
 *	  torn down per call (the step joined to its run and its definition,
 *	  up to seven indexes opened and their predicates prepared, transition
 *	  tables filled for the audit trigger): for one task, more than the
 *	  rest of the claim or the verdict together.  Here a row is written
 *	  through the table's access method, its index entries are made as the
 *	  executor makes them, its AFTER ROW triggers (a foreign key's, the
 *	  parent run's wake-up) are queued and fired as for a statement, and its
 *	  audit event is recorded as the table's orch._audit() trigger records
 *	  it.
 *
 *	  Only where that is all the executor would do: a table with a trigger
 *	  that fires BEFORE, per statement (other than orch._audit()) or with
 *	  transition tables, with rules, row-level security, check constraints
 *	  or generated columns, is written by the caller's SQL statement
 *	  instead (orch_writer_begin returns false).  Every column of an
 *	  INSERT is given (no defaults), and the caller runs as the table's
 *	  owner (a SECURITY DEFINER function of the extension, or the engine),
 *	  as its SQL statement would.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/gin_private.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/pg_am.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteManip.h"
#include "storage/sinval.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "orchestrator.h"
#include "audit.h"

/*
 * What writing a table's rows prepares, kept for the session: its indexes
 * as a write opens them (each one's IndexInfo, the predicate of a partial
 * index and the expressions of an expression index prepared for
 * evaluation, a GIN index's state), the WHEN conditions of its triggers
 * prepared as the trigger manager prepares them, and which of its columns
 * are of a domain type.  The executor builds all of it again for every
 * statement (ExecOpenIndices; an index's first insert, a trigger's first
 * event): for a verdict's three writes and a claim's, over a tenth of a
 * task.  Each write opens the indexes itself (locks them, as
 * ExecOpenIndices does) and takes a copy of each IndexInfo, which shares
 * what was prepared (the executor caches in it what one statement's
 * update leaves unchanged, and an index AM its own state).
 *
 * A relcache invalidation of the table or of one of its indexes (an index
 * created, dropped, made ready or valid; a trigger or a column changed)
 * makes the entry stale, and the next write builds it again.  What a stale
 * entry prepared may still be in use by a write of the transaction: its
 * memory goes with the transaction.
 */
typedef struct TableCache
{
	struct TableCache *next;
	Oid			relid;			/* the table */
	bool		ready;			/* false: build again before use */
	MemoryContext cxt;			/* holds what follows (NULL: nothing built) */
	int			nindexes;
	Oid		   *indexes;		/* in RelationGetIndexList's order */
	IndexInfo **info;
	int			ntriggers;		/* as in the relcache's trigdesc */
	Oid		   *tgoid;
	ExprState **when;			/* each trigger's WHEN, or NULL */
	bool	   *is_domain;		/* by attribute number - 1 */
} TableCache;

static TableCache *table_caches;

static void
table_caches_invalidate(Datum arg, Oid relid)
{
	for (TableCache *c = table_caches; c != NULL; c = c->next)
	{
		if (!OidIsValid(relid) || relid == c->relid)
			c->ready = false;
		for (int i = 0; c->ready && i < c->nindexes; i++)
			if (relid == c->indexes[i])
				c->ready = false;
	}
}

static TableCache *
table_cache_of(Oid relid)
{
	TableCache *c;

	for (c = table_caches; c != NULL; c = c->next)
		if (c->relid == relid)
			return c;
	if (table_caches == NULL)
		CacheRegisterRelcacheCallback(table_caches_invalidate, (Datum) 0);
	c = MemoryContextAllocZero(TopMemoryContext, sizeof(TableCache));
	c->relid = relid;
	c->next = table_caches;
	table_caches = c;
	return c;
}

/* A partial index's predicate, or an expression, ready to evaluate (as ExecPrepareExpr) */
static ExprState *
prepare_qual(List *qual)
{
	return ExecInitQual((List *) expression_planner((Expr *) qual), NULL);
}

/* What writes of rel need of its indexes (see TableCache) */
static void
table_cache_indexes(TableCache *c, Relation rel)
{
	List	   *oids = RelationGetIndexList(rel);
	ListCell   *lc;

	c->indexes = palloc(sizeof(Oid) * Max(list_length(oids), 1));
	c->info = palloc(sizeof(IndexInfo *) * Max(list_length(oids), 1));
	foreach(lc, oids)
	{
		Relation	index = index_open(lfirst_oid(lc), RowExclusiveLock);
		IndexInfo  *ii = BuildIndexInfo(index);

		if (ii->ii_Predicate != NIL)
			ii->ii_PredicateState = prepare_qual(ii->ii_Predicate);
		if (ii->ii_Expressions != NIL)
		{
			ListCell   *e;

			foreach(e, ii->ii_Expressions)
				ii->ii_ExpressionsState =
					lappend(ii->ii_ExpressionsState,
							ExecInitExpr(expression_planner((Expr *) lfirst(e)), NULL));
		}
		if (index->rd_rel->relam == GIN_AM_OID)
		{
			GinState   *gin = palloc(sizeof(GinState));

			/* as gininsert builds it into ii_AmCache, which a copy shares */
			initGinState(gin, index);
			ii->ii_AmCache = gin;
		}
		c->indexes[c->nindexes] = RelationGetRelid(index);
		c->info[c->nindexes] = ii;
		c->nindexes++;
		index_close(index, RowExclusiveLock);
	}
	list_free(oids);
}

/*
 * The WHEN conditions of rel's triggers, prepared as TriggerEnabled
 * prepares them for a statement: OLD's columns read from the inner tuple,
 * NEW's from the outer.
 */
static void
table_cache_triggers(TableCache *c, Relation rel)
{
	TriggerDesc *td = rel->trigdesc;

	c->ntriggers = td != NULL ? td->numtriggers : 0;
	c->tgoid = palloc(sizeof(Oid) * Max(c->ntriggers, 1));
	c->when = palloc0(sizeof(ExprState *) * Max(c->ntriggers, 1));
	for (int i = 0; i < c->ntriggers; i++)
	{
		Node	   *qual;

		c->tgoid[i] = td->triggers[i].tgoid;
		if (td->triggers[i].tgqual == NULL)
			continue;
		qual = stringToNode(td->triggers[i].tgqual);
		ChangeVarNodes(qual, PRS2_OLD_VARNO, INNER_VAR, 0);
		ChangeVarNodes(qual, PRS2_NEW_VARNO, OUTER_VAR, 0);
		c->when[i] = prepare_qual(make_ands_implicit((Expr *) qual));
	}
}

/*
 * Build c from rel as it is now.  What c held before goes with the
 * transaction; what is built here is the transaction's too until it is
 * complete (an error meanwhile leaves c stale, and nothing in it is read
 * before it is built again).
 */
static void
table_cache_build(TableCache *c, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	MemoryContext cxt,
				oldcxt;

	if (c->cxt != NULL)
		MemoryContextSetParent(c->cxt, TopTransactionContext);
	c->cxt = NULL;
	c->nindexes = 0;
	c->ntriggers = 0;
	c->ready = false;

	cxt = AllocSetContextCreate(TopTransactionContext, "orchestrator table cache",
								ALLOCSET_SMALL_SIZES);
	oldcxt = MemoryContextSwitchTo(cxt);
	table_cache_indexes(c, rel);
	table_cache_triggers(c, rel);
	c->is_domain = palloc(sizeof(bool) * Max(desc->natts, 1));
	for (int a = 0; a < desc->natts; a++)
		c->is_domain[a] = !TupleDescAttr(desc, a)->attisdropped &&
			get_typtype(TupleDescAttr(desc, a)->atttypid) == TYPTYPE_DOMAIN;
	MemoryContextSwitchTo(oldcxt);
	MemoryContextSetParent(cxt, CacheMemoryContext);
	c->cxt = cxt;
	c->ready = true;
}

/*
 * Open the indexes of rri's table for inserting into them, as
 * ExecOpenIndices (with speculative false) does, from the session's cache
 * of the table, which is returned; and give rri the triggers' prepared
 * WHEN conditions.  Close the indexes with ExecCloseIndices.
 */
static TableCache *
open_indices(ResultRelInfo *rri)
{
	Relation	rel = rri->ri_RelationDesc;
	TableCache *c = table_cache_of(RelationGetRelid(rel));

	for (;;)
	{
		uint64		invals = SharedInvalidMessageCounter;
		bool		built = !c->ready;

		if (built)
			table_cache_build(c, rel);
		rri->ri_NumIndices = 0;
		rri->ri_IndexRelationDescs = palloc(sizeof(Relation) * Max(c->nindexes, 1));
		rri->ri_IndexRelationInfo = palloc(sizeof(IndexInfo *) * Max(c->nindexes, 1));
		for (int i = 0; i < c->nindexes; i++)
		{
			rri->ri_IndexRelationDescs[i] = index_open(c->indexes[i], RowExclusiveLock);
			rri->ri_NumIndices = i + 1;
		}

		/*
		 * Locking the indexes processes invalidations: of one of these
		 * (the entry is stale), or, while the entry was being built, of
		 * anything (it may have missed one of its own).
		 */
		if (c->ready && !(built && invals != SharedInvalidMessageCounter))
			break;
		ExecCloseIndices(rri);
		c->ready = false;
	}
	for (int i = 0; i < c->nindexes; i++)
	{
		IndexInfo  *ii = palloc(sizeof(IndexInfo));

		memcpy(ii, c->info[i], sizeof(IndexInfo));
		ii->ii_Context = CurrentMemoryContext;
		rri->ri_IndexRelationInfo[i] = ii;
	}
	if (rri->ri_TrigDesc != NULL && rri->ri_TrigDesc->numtriggers == c->ntriggers)
	{
		for (int i = 0; i < c->ntriggers; i++)
			if (rri->ri_TrigDesc->triggers[i].tgoid == c->tgoid[i])
				rri->ri_TrigWhenExprs[i] = c->when[i];
	}
	return c;
}

/* Open the indexes of rri's table for inserting into them (see open_indices). */
void
orch_open_indices(ResultRelInfo *rri)
{
	(void) open_indices(rri);
}

/*
 * Would the executor do more for op on rel than write the row, its index
 * entries, its AFTER ROW triggers' events and its audit event?
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

		if (!orch_trigger_of(t, op) || orch_audit_trigger_of(t, op))
			continue;
		if (TRIGGER_FOR_ROW(t->tgtype) && TRIGGER_FOR_AFTER(t->tgtype) &&
			t->tgoldtable == NULL && t->tgnewtable == NULL)
			continue;
		return true;
	}
	return false;
}

/*
 * orch_writer_begin's written for the columns from..to of an OrchRowSource
 * whose attribute numbers are att (orch_row_source_attnums).
 */
bool *
orch_writer_columns(const int16 *att, int from, int to)
{
	bool	   *written = palloc0(sizeof(bool) * MaxHeapAttributeNumber);

	for (int c = from; c <= to; c++)
		written[att[c] - 1] = true;
	return written;
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
 * Get ready to write rows of relid: op CMD_UPDATE, the columns written
 * being those set in written (by attribute number - 1), or CMD_INSERT.
 * False when the table needs the executor (see above): nothing is open
 * then, and the caller writes with SQL.  The caller fills w->values and
 * w->nulls with each row for orch_writer_update and orch_writer_insert.
 */
bool
orch_writer_begin(OrchRowWriter *w, Oid relid, CmdType op, const bool *written)
{
	RangeTblEntry *rte;
	TupleDesc	desc;
	TableCache *cache;

	Assert(op == CMD_UPDATE || op == CMD_INSERT);
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
	w->op = op;
	w->estate = CreateExecutorState();

	/*
	 * A range table of the one relation, with the columns written: the
	 * index AMs are told which entries an update leaves unchanged, and
	 * triggers of UPDATE OF columns fire, as for the executor's statement.
	 */
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = relid;
	rte->relkind = w->rel->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	w->values = palloc0(sizeof(Datum) * desc->natts);
	w->nulls = palloc0(sizeof(bool) * desc->natts);
	w->written = palloc(sizeof(bool) * desc->natts);
	w->domain = palloc0(sizeof(void *) * desc->natts);
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);

		w->written[a] = op == CMD_INSERT ? !att->attisdropped : written[a];
		if (!w->written[a])
			continue;
		if (op == CMD_UPDATE)
			rte->updatedCols = bms_add_member(rte->updatedCols,
											  a + 1 - FirstLowInvalidHeapAttributeNumber);
		else
			rte->insertedCols = bms_add_member(rte->insertedCols,
											   a + 1 - FirstLowInvalidHeapAttributeNumber);
	}
	ExecInitRangeTable(w->estate, list_make1(rte));
	w->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(w->rri, w->rel, 1, NULL, 0);
	/* where the firing of its AFTER ROW triggers finds it */
	w->estate->es_opened_result_relations = list_make1(w->rri);
	cache = open_indices(w->rri);
	w->is_domain = palloc(sizeof(bool) * desc->natts);
	for (int a = 0; a < desc->natts; a++)
		w->is_domain[a] = w->written[a] && cache->is_domain[a];
	w->before = table_slot_create(w->rel, &w->estate->es_tupleTable);
	w->after = ExecInitExtraTupleSlot(w->estate, desc, &TTSOpsVirtual);

	/* AFTER ROW triggers are queued as a statement's, and fired at the end */
	w->row_triggers = w->rri->ri_TrigDesc != NULL &&
		(op == CMD_UPDATE ? w->rri->ri_TrigDesc->trig_update_after_row :
		 w->rri->ri_TrigDesc->trig_insert_after_row);
	if (w->row_triggers)
		AfterTriggerBeginQuery();
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
 * The row whose key (src: a unique index of the table) equals keys, and
 * that holds m's value if m is given, found and locked as an UPDATE by
 * that key (and that condition) finds and locks it (orch_row_lock), into
 * w->before; false if there is none.  The lock is FOR UPDATE's, which
 * an UPDATE that leaves the key alone takes only against FOR KEY SHARE:
 * nothing takes that on the orchestrator's tables (no foreign key refers
 * to them).
 */
bool
orch_writer_lock(OrchRowWriter *w, OrchRowSource *src, const Datum *keys, const OrchRowMatch *m)
{
	if (!orch_row_lock(src, keys, m, w->before))
		return false;
	slot_getallattrs(w->before);
	return true;
}

/*
 * The new row in w->after: for an UPDATE the columns written take
 * w->values and w->nulls (by attribute number - 1) and the others stay as
 * in w->before; an INSERT gives every column.  Checked as the executor
 * checks an assigned value: NOT NULL, and a domain's constraints.
 */
static void
form_row(OrchRowWriter *w)
{
	TupleDesc	desc = RelationGetDescr(w->rel);

	ExecClearTuple(w->after);
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		bool		isnull = w->written[a] ? w->nulls[a] :
			w->op == CMD_INSERT || w->before->tts_isnull[a];	/* dropped, or as it was */

		if (isnull && att->attnotnull)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of relation \"%s\" violates not-null constraint",
							NameStr(att->attname), RelationGetRelationName(w->rel)),
					 errtable(w->rel)));
		w->after->tts_isnull[a] = isnull;
		w->after->tts_values[a] = isnull ? (Datum) 0 :
			w->written[a] ? w->values[a] : w->before->tts_values[a];
		if (w->is_domain[a])
			domain_check(w->after->tts_values[a], isnull, att->atttypid, &w->domain[a],
						 w->estate->es_query_cxt);
	}
	ExecStoreVirtualTuple(w->after);
}

/*
 * Update the row in w->before (orch_writer_fetch, orch_writer_lock): the
 * columns written take w->values and w->nulls, the others stay.  The new
 * row is in w->after afterwards.
 */
void
orch_writer_update(OrchRowWriter *w)
{
	ItemPointerData tid = w->before->tts_tid;
	TM_FailureData tmfd;
	LockTupleMode lockmode;
	bool		update_indexes;
	List	   *recheck = NIL;
	TM_Result	r;
	MemoryContext oldcxt;

	Assert(w->op == CMD_UPDATE);
	form_row(w);
	/* what writing it allocates (compressed values, index tuples) goes with the row */
	oldcxt = MemoryContextSwitchTo(GetPerTupleMemoryContext(w->estate));
	r = table_tuple_update(w->rel, &tid, w->after, GetCurrentCommandId(true), InvalidSnapshot,
						   InvalidSnapshot, true, &tmfd, &lockmode, &update_indexes);
	if (r != TM_Ok)
		elog(ERROR, "could not update a locked row of %s: %d", RelationGetRelationName(w->rel),
			 (int) r);
	if (w->rri->ri_NumIndices > 0 && update_indexes)
		recheck = ExecInsertIndexTuples(w->rri, w->after, w->estate, true, false, NULL, NIL);
	if (w->row_triggers)
		ExecARUpdateTriggers(w->estate, w->rri, NULL, NULL, &tid, NULL, w->after, recheck,
							 NULL, false);
	MemoryContextSwitchTo(oldcxt);
	ResetPerTupleExprContext(w->estate);
	if (w->audit != NULL)
		orch_audit_rows_add(w->audit, w->before, w->after);
}

/* Insert a row: w->values and w->nulls of every column. */
void
orch_writer_insert(OrchRowWriter *w)
{
	List	   *recheck = NIL;
	MemoryContext oldcxt;

	Assert(w->op == CMD_INSERT);
	form_row(w);
	/* as in orch_writer_update */
	oldcxt = MemoryContextSwitchTo(GetPerTupleMemoryContext(w->estate));
	table_tuple_insert(w->rel, w->after, GetCurrentCommandId(true), 0, NULL);
	if (w->rri->ri_NumIndices > 0)
		recheck = ExecInsertIndexTuples(w->rri, w->after, w->estate, false, false, NULL, NIL);
	if (w->row_triggers)
		ExecARInsertTriggers(w->estate, w->rri, w->after, recheck, NULL);
	MemoryContextSwitchTo(oldcxt);
	ResetPerTupleExprContext(w->estate);
	if (w->audit != NULL)
		orch_audit_rows_add(w->audit, NULL, w->after);
}

/*
 * Done: the rows' AFTER ROW triggers fired, their audit events recorded,
 * everything closed, and the rows written made visible to the
 * transaction's next commands.
 */
void
orch_writer_end(OrchRowWriter *w)
{
	if (w->row_triggers)
		AfterTriggerEndQuery(w->estate);
	if (w->audit != NULL)
		orch_audit_rows_end(w->audit);
	/* its indexes, and what firing the triggers opened */
	ExecCloseResultRelations(w->estate);
	ExecResetTupleTable(w->estate->es_tupleTable, false);
	FreeExecutorState(w->estate);
	table_close(w->rel, NoLock);
	memset(w, 0, sizeof(*w));
	CommandCounterIncrement();
}
