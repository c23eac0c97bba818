/*-------------------------------------------------------------------------
 * audit.c
 *	  The audit trail: the trigger that records row changes in
 *	  orch.audit_log, the canonical encoding and hash of an audit row, and
 *	  the refusal of anything but appending to the audit tables.
 *
 *	  A change is recorded by a statement-level AFTER trigger that reads the
 *	  statement's transition tables, so a statement that changes many rows
 *	  writes their audit rows with one INSERT.  Each row carries the SHA-256
 *	  of its canonical encoding (docs/audit.md), which depends on nothing
 *	  but the row's values: not on settings, not on how jsonb prints.  The
 *	  write path locks no shared row; audit_seal.c chains finished rows into
 *	  blocks afterwards.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/uuid.h"
#include "utils/xid8.h"

#include "orchestrator.h"
#include "audit.h"

/* settings: the application's actor and reason, usually transaction-local */
char	   *orch_audit_actor = NULL;
char	   *orch_audit_reason = NULL;

/* the step whose function is running in this backend, if any */
static bool step_context_set = false;
static pg_uuid_t step_context_run;
static int64 step_context_step;

/* set only while orch.purge_audit removes sealed ranges */
bool		orch_audit_purging = false;

/* audit rows written with one INSERT at most */
#define AUDIT_FLUSH_ROWS	1000

void
orch_audit_set_step(Datum run_id, int64 step_id)
{
	memcpy(&step_context_run, DatumGetUUIDP(run_id), sizeof(pg_uuid_t));
	step_context_step = step_id;
	step_context_set = true;
}

void
orch_audit_clear_step(void)
{
	step_context_set = false;
}

/* ------------------------------------------------------------------------
 * Canonical encoding (docs/audit.md)
 * ------------------------------------------------------------------------ */

static void
put_u32(StringInfo buf, uint32 v)
{
	char		b[4] = {(char) (v >> 24), (char) (v >> 16), (char) (v >> 8), (char) v};

	appendBinaryStringInfo(buf, b, 4);
}

static void
put_u64(StringInfo buf, uint64 v)
{
	put_u32(buf, (uint32) (v >> 32));
	put_u32(buf, (uint32) v);
}

/* A field: 0x01, its length (4 bytes, big-endian), its bytes. */
static void
enc_bytes(StringInfo buf, const void *data, uint32 len)
{
	appendStringInfoChar(buf, 1);
	put_u32(buf, len);
	appendBinaryStringInfo(buf, data, (int) len);
}

/* A NULL field: 0x00 alone. */
static void
enc_null(StringInfo buf)
{
	appendStringInfoChar(buf, 0);
}

static void
enc_u64(StringInfo buf, uint64 v)
{
	appendStringInfoChar(buf, 1);
	put_u32(buf, 8);
	put_u64(buf, v);
}

static void
enc_cstring(StringInfo buf, const char *s)
{
	if (s == NULL)
		enc_null(buf);
	else
		enc_bytes(buf, s, (uint32) strlen(s));
}

/* A JSON scalar: a tag byte, then for strings and numbers a length and bytes. */
static void
json_scalar(StringInfo out, JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			appendStringInfoChar(out, 'Z');
			break;
		case jbvBool:
			appendStringInfoChar(out, v->val.boolean ? 'T' : 'F');
			break;
		case jbvString:
			appendStringInfoChar(out, 'S');
			put_u32(out, (uint32) v->val.string.len);
			appendBinaryStringInfo(out, v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			{
				char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out,
																	NumericGetDatum(v->val.numeric)));

				appendStringInfoChar(out, 'N');
				put_u32(out, (uint32) strlen(s));
				appendStringInfoString(out, s);
				pfree(s);
				break;
			}
		default:
			elog(ERROR, "unexpected jsonb value type %d in an audit row", (int) v->type);
	}
}

/*
 * A jsonb value in canonical form: objects as 'O', their number of keys and
 * each key (length, bytes) with its value, in jsonb's key order (shorter
 * keys first, then bytewise); arrays as 'A', their length and elements.
 */
static void
json_canon(StringInfo out, Jsonb *jb)
{
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken tok;

	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (tok)
		{
			case WJB_BEGIN_OBJECT:
				appendStringInfoChar(out, 'O');
				put_u32(out, (uint32) v.val.object.nPairs);
				break;
			case WJB_BEGIN_ARRAY:
				if (!v.val.array.rawScalar)
				{
					appendStringInfoChar(out, 'A');
					put_u32(out, (uint32) v.val.array.nElems);
				}
				break;
			case WJB_KEY:
				put_u32(out, (uint32) v.val.string.len);
				appendBinaryStringInfo(out, v.val.string.val, v.val.string.len);
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				json_scalar(out, &v);
				break;
			case WJB_END_OBJECT:
			case WJB_END_ARRAY:
			case WJB_DONE:
				break;
		}
	}
}

static void
enc_jsonb(StringInfo buf, Jsonb *jb)
{
	StringInfoData j;

	if (jb == NULL)
	{
		enc_null(buf);
		return;
	}
	initStringInfo(&j);
	json_canon(&j, jb);
	enc_bytes(buf, j.data, (uint32) j.len);
	pfree(j.data);
}

/* Microseconds since 1970-01-01 00:00 UTC. */
static int64
unix_usecs(TimestampTz t)
{
	return t + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
}

void
orch_sha256(const void *data, size_t len, uint8 *out)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, data, len) < 0 ||
		pg_cryptohash_final(ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(ctx));
	pg_cryptohash_free(ctx);
}

/* The canonical encoding of an audit row (version 1) and its SHA-256. */
void
orch_audit_row_hash(const OrchAuditRow *r, uint8 *out)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, ORCH_AUDIT_ENCODING_VERSION);
	enc_u64(&buf, (uint64) r->audit_id);
	enc_u64(&buf, r->xid);
	enc_u64(&buf, (uint64) unix_usecs(r->at));
	enc_cstring(&buf, r->table_name);
	enc_cstring(&buf, r->operation);
	enc_jsonb(&buf, r->row_key);
	enc_jsonb(&buf, r->old_row);
	enc_jsonb(&buf, r->new_row);
	enc_cstring(&buf, r->actor);
	enc_cstring(&buf, r->db_user);
	enc_cstring(&buf, r->session_role);
	if (r->run_id != NULL)
		enc_bytes(&buf, r->run_id->data, UUID_LEN);
	else
		enc_null(&buf);
	if (r->has_step)
		enc_u64(&buf, (uint64) r->step_id);
	else
		enc_null(&buf);
	enc_cstring(&buf, r->reason);
	orch_sha256(buf.data, buf.len, out);
	pfree(buf.data);
}

/* The canonical encoding of a block (version 1) and its SHA-256. */
void
orch_audit_block_hash(const OrchAuditBlock *b, uint8 *out)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, ORCH_AUDIT_ENCODING_VERSION);
	enc_u64(&buf, (uint64) b->block_id);
	enc_u64(&buf, b->xid_from);
	enc_u64(&buf, b->xid_to);
	enc_u64(&buf, (uint64) unix_usecs(b->sealed_at));
	enc_u64(&buf, (uint64) b->n_rows);
	enc_bytes(&buf, b->merkle_root, PG_SHA256_DIGEST_LENGTH);
	enc_u64(&buf, b->system_identifier);
	enc_u64(&buf, (uint64) b->timeline);
	enc_bytes(&buf, b->prev_hash, PG_SHA256_DIGEST_LENGTH);
	orch_sha256(buf.data, buf.len, out);
	pfree(buf.data);
}

/*
 * The Merkle tree hash of n leaves of 32 bytes (RFC 6962, section 2.1):
 * a leaf hashes as SHA-256(0x00 || leaf), a node as SHA-256(0x01 || left
 * || right), splitting at the largest power of two below n; no leaves hash
 * as SHA-256 of nothing.
 */
void
orch_merkle_root(const uint8 *leaves, int64 n, uint8 *out)
{
	uint8		buf[1 + 2 * PG_SHA256_DIGEST_LENGTH];

	if (n == 0)
		orch_sha256("", 0, out);
	else if (n == 1)
	{
		buf[0] = 0x00;
		memcpy(buf + 1, leaves, PG_SHA256_DIGEST_LENGTH);
		orch_sha256(buf, 1 + PG_SHA256_DIGEST_LENGTH, out);
	}
	else
	{
		int64		k = 1;

		while (k * 2 < n)
			k *= 2;
		buf[0] = 0x01;
		orch_merkle_root(leaves, k, buf + 1);
		orch_merkle_root(leaves + k * PG_SHA256_DIGEST_LENGTH, n - k,
						 buf + 1 + PG_SHA256_DIGEST_LENGTH);
		orch_sha256(buf, sizeof(buf), out);
	}
}

/* ------------------------------------------------------------------------
 * Row values as jsonb, independent of the session's settings
 * ------------------------------------------------------------------------ */

/*
 * Settings under which values are rendered for the audit trail: to_jsonb
 * renders timestamps with the session's time zone, intervals and arrays of
 * dates with its styles, floats with its extra_float_digits.
 */
static const char *const render_settings[][2] = {
	{"TimeZone", "UTC"}, {"DateStyle", "ISO, YMD"}, {"IntervalStyle", "iso_8601"},
	{"extra_float_digits", "1"}, {"bytea_output", "hex"}
};

static int
render_settings_push(void)
{
	int			nest_level = NewGUCNestLevel();

	for (int i = 0; i < (int) lengthof(render_settings); i++)
		(void) set_config_option(render_settings[i][0], render_settings[i][1],
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	return nest_level;
}

/* How to render the columns of one table: to_jsonb for each column's type. */
typedef struct RelRender
{
	TupleDesc	desc;
	FmgrInfo   *to_jsonb;		/* per attribute; fn_oid InvalidOid if dropped */
	Bitmapset  *key_attrs;		/* primary key attribute numbers */
	AttrNumber	run_attr;		/* "run_id uuid", or 0 */
	AttrNumber	step_attr;		/* "step_id bigint", or 0 */
} RelRender;

static void
rel_render_init(RelRender *rr, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Bitmapset  *pk = RelationGetIndexAttrBitmap(rel, INDEX_ATTR_BITMAP_PRIMARY_KEY);
	int			a;

	rr->desc = desc;
	rr->to_jsonb = palloc0(sizeof(FmgrInfo) * desc->natts);
	rr->key_attrs = NULL;
	rr->run_attr = 0;
	rr->step_attr = 0;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped)
			continue;
		/* to_jsonb(anyelement) learns the type from its call expression */
		fmgr_info(F_TO_JSONB, &rr->to_jsonb[i]);
		rr->to_jsonb[i].fn_expr = (Node *)
			makeFuncExpr(F_TO_JSONB, JSONBOID,
						 list_make1(makeNullConst(att->atttypid, att->atttypmod, att->attcollation)),
						 InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		if (strcmp(NameStr(att->attname), "run_id") == 0 && att->atttypid == UUIDOID)
			rr->run_attr = att->attnum;
		if (strcmp(NameStr(att->attname), "step_id") == 0 && att->atttypid == INT8OID)
			rr->step_attr = att->attnum;
	}
	a = -1;
	while ((a = bms_next_member(pk, a)) >= 0)
		rr->key_attrs = bms_add_member(rr->key_attrs, a + FirstLowInvalidHeapAttributeNumber);
}

/* Push one column's value as the value of its key. */
static void
push_column(JsonbParseState **state, RelRender *rr, int i, Datum value, bool isnull)
{
	Form_pg_attribute att = TupleDescAttr(rr->desc, i);
	JsonbValue	key;
	JsonbValue	val;

	key.type = jbvString;
	key.val.string.val = NameStr(att->attname);
	key.val.string.len = (int) strlen(NameStr(att->attname));
	(void) pushJsonbValue(state, WJB_KEY, &key);
	if (isnull)
	{
		val.type = jbvNull;
		(void) pushJsonbValue(state, WJB_VALUE, &val);
		return;
	}
	else
	{
		Jsonb	   *jb = DatumGetJsonbP(FunctionCall1(&rr->to_jsonb[i], value));

		if (JB_ROOT_IS_SCALAR(jb))
		{
			if (!JsonbExtractScalar(&jb->root, &val))
				elog(ERROR, "could not read a scalar jsonb");
		}
		else
		{
			val.type = jbvBinary;
			val.val.binary.data = &jb->root;
			val.val.binary.len = (int) (VARSIZE(jb) - VARHDRSZ);
		}
		(void) pushJsonbValue(state, WJB_VALUE, &val);
	}
}

/*
 * The columns of a row as a jsonb object: all of them (which NULL), those
 * of the primary key (key), or those whose value differs from other's.
 */
typedef enum RenderWhich
{
	RENDER_ALL,
	RENDER_KEY,
	RENDER_CHANGED
} RenderWhich;

static bool
column_changed(Form_pg_attribute att, Datum a, bool anull, Datum b, bool bnull)
{
	if (anull || bnull)
		return anull != bnull;
	if (att->attlen == -1)
	{
		struct varlena *va = PG_DETOAST_DATUM_PACKED(a);
		struct varlena *vb = PG_DETOAST_DATUM_PACKED(b);

		return VARSIZE_ANY_EXHDR(va) != VARSIZE_ANY_EXHDR(vb) ||
			memcmp(VARDATA_ANY(va), VARDATA_ANY(vb), VARSIZE_ANY_EXHDR(va)) != 0;
	}
	return !datumIsEqual(a, b, att->attbyval, att->attlen);
}

static Jsonb *
render_row(RelRender *rr, TupleTableSlot *slot, RenderWhich which, TupleTableSlot *other)
{
	JsonbParseState *state = NULL;
	JsonbValue *res;

	slot_getallattrs(slot);
	if (other != NULL)
		slot_getallattrs(other);
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < rr->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(rr->desc, i);

		if (att->attisdropped)
			continue;
		if (which == RENDER_KEY && !bms_is_member(att->attnum, rr->key_attrs))
			continue;
		if (which == RENDER_CHANGED &&
			!column_changed(att, slot->tts_values[i], slot->tts_isnull[i],
							other->tts_values[i], other->tts_isnull[i]))
			continue;
		push_column(&state, rr, i, slot->tts_values[i], slot->tts_isnull[i]);
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* ------------------------------------------------------------------------
 * Writing audit rows
 * ------------------------------------------------------------------------ */

#define INSERT_AUDIT_SQL \
	"INSERT INTO orch.audit_log (audit_id, xid, at, table_name, operation, row_key, old_row," \
	"                            new_row, actor, db_user, session_role, run_id, step_id," \
	"                            reason, row_hash)" \
	" OVERRIDING SYSTEM VALUE" \
	" SELECT u.audit_id, $8, $9, $10, $11, u.row_key, u.old_row, u.new_row, $12, $13, $14," \
	"        u.run_id, u.step_id, $15, u.row_hash" \
	"   FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3)," \
	"                   pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6)," \
	"                   pg_catalog.unnest($7))" \
	"     AS u(audit_id, row_key, old_row, new_row, run_id, step_id, row_hash)"

static SPIPlanPtr insert_plan = NULL;
static Oid	audit_seq = InvalidOid;	/* audit_id's sequence ... */
static Oid	audit_seq_of = InvalidOid;	/* ... of this orch.audit_log */

/* Audit rows of one statement (or one event), written in chunks. */
typedef struct AuditBatch
{
	OrchAuditRow common;		/* xid, at, table, operation, who, reason */
	int			n;
	Datum		ids[AUDIT_FLUSH_ROWS];
	Datum		keys[AUDIT_FLUSH_ROWS];
	bool		key_nulls[AUDIT_FLUSH_ROWS];
	Datum		olds[AUDIT_FLUSH_ROWS];
	bool		old_nulls[AUDIT_FLUSH_ROWS];
	Datum		news[AUDIT_FLUSH_ROWS];
	bool		new_nulls[AUDIT_FLUSH_ROWS];
	Datum		runs[AUDIT_FLUSH_ROWS];
	bool		run_nulls[AUDIT_FLUSH_ROWS];
	Datum		steps[AUDIT_FLUSH_ROWS];
	bool		step_nulls[AUDIT_FLUSH_ROWS];
	Datum		hashes[AUDIT_FLUSH_ROWS];
	MemoryContext rows_cxt;		/* the chunk's values */
} AuditBatch;

static ArrayType *
make_array(Datum *values, bool *nulls, int n, Oid type)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int16		len;
	bool		byval;
	char		align;

	get_typlenbyvalalign(type, &len, &byval, &align);
	return construct_md_array(values, nulls, 1, dims, lbs, type, len, byval, align);
}

Oid
orch_rel_owner(Oid relid)
{
	HeapTuple	tp = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	Oid			owner;

	if (!HeapTupleIsValid(tp))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tp))->relowner;
	ReleaseSysCache(tp);
	return owner;
}

static Oid
audit_log_relid(void)
{
	Oid			nsp = get_namespace_oid("orch", false);
	Oid			relid = get_relname_relid("audit_log", nsp);

	if (!OidIsValid(relid))
		elog(ERROR, "orch.audit_log is missing");
	return relid;
}

/*
 * Write the batch's rows with one INSERT, as the owner of orch.audit_log:
 * the user whose change is recorded may not write to it.
 */
static void
batch_flush(AuditBatch *b)
{
	Datum		args[15];
	char		nulls[15];
	Oid			save_userid;
	int			save_sec;
	Oid			owner;
	Oid			relid;

	if (b->n == 0)
		return;
	relid = audit_log_relid();
	owner = orch_rel_owner(relid);

	memset(nulls, ' ', sizeof(nulls));
	args[0] = PointerGetDatum(make_array(b->ids, NULL, b->n, INT8OID));
	args[1] = PointerGetDatum(make_array(b->keys, b->key_nulls, b->n, JSONBOID));
	args[2] = PointerGetDatum(make_array(b->olds, b->old_nulls, b->n, JSONBOID));
	args[3] = PointerGetDatum(make_array(b->news, b->new_nulls, b->n, JSONBOID));
	args[4] = PointerGetDatum(make_array(b->runs, b->run_nulls, b->n, UUIDOID));
	args[5] = PointerGetDatum(make_array(b->steps, b->step_nulls, b->n, INT8OID));
	args[6] = PointerGetDatum(make_array(b->hashes, NULL, b->n, BYTEAOID));
	args[7] = FullTransactionIdGetDatum(FullTransactionIdFromU64(b->common.xid));
	args[8] = TimestampTzGetDatum(b->common.at);
	args[9] = CStringGetTextDatum(b->common.table_name);
	args[10] = CStringGetTextDatum(b->common.operation);
	args[11] = b->common.actor ? CStringGetTextDatum(b->common.actor) : (Datum) 0;
	nulls[11] = b->common.actor ? ' ' : 'n';
	args[12] = CStringGetTextDatum(b->common.db_user);
	args[13] = CStringGetTextDatum(b->common.session_role);
	args[14] = b->common.reason ? CStringGetTextDatum(b->common.reason) : (Datum) 0;
	nulls[14] = b->common.reason ? ' ' : 'n';

	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (insert_plan == NULL)
		{
			Oid			types[15] = {INT8ARRAYOID, JSONBARRAYOID, JSONBARRAYOID, JSONBARRAYOID,
				UUIDARRAYOID, INT8ARRAYOID, BYTEAARRAYOID, XID8OID, TIMESTAMPTZOID,
			TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
			SPIPlanPtr	plan = SPI_prepare(INSERT_AUDIT_SQL, 15, types);

			if (plan == NULL || SPI_keepplan(plan) != 0)
				elog(ERROR, "could not prepare the audit insert: %s",
					 SPI_result_code_string(SPI_result));
			insert_plan = plan;
		}
		if (SPI_execute_plan(insert_plan, args, nulls, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "could not write audit rows");
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();

	b->n = 0;
	MemoryContextReset(b->rows_cxt);
}

/* Who, when and why, for every row of a statement. */
static void
batch_begin_stmt(AuditBatch *b, const char *table_name, const char *operation)
{
	memset(&b->common, 0, sizeof(b->common));
	b->common.xid = U64FromFullTransactionId(GetTopFullTransactionId());
	b->common.at = GetCurrentTimestamp();
	b->common.table_name = table_name;
	b->common.operation = operation;
	b->common.actor = orch_audit_actor != NULL && orch_audit_actor[0] != '\0' ?
		pstrdup(orch_audit_actor) : NULL;
	b->common.reason = orch_audit_reason != NULL && orch_audit_reason[0] != '\0' ?
		pstrdup(orch_audit_reason) : NULL;
	b->common.db_user = GetUserNameFromId(GetUserId(), false);
	b->common.session_role = GetUserNameFromId(GetSessionUserId(), false);
	b->n = 0;
	{
		/* the extension may have been dropped and created again since */
		Oid			relid = audit_log_relid();

		if (relid != audit_seq_of)
		{
			audit_seq = getIdentitySequence(relid, 1, false);
			audit_seq_of = relid;
		}
	}
}

/* Add one row: its hash is taken over every field, audit_id included. */
static void
batch_add(AuditBatch *b, Jsonb *row_key, Jsonb *old_row, Jsonb *new_row,
		  pg_uuid_t *run_id, bool has_step, int64 step_id)
{
	OrchAuditRow r = b->common;
	MemoryContext oldcxt = MemoryContextSwitchTo(b->rows_cxt);
	bytea	   *hash = palloc(VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	int			i = b->n;

	r.audit_id = nextval_internal(audit_seq, false);
	r.row_key = row_key;
	r.old_row = old_row;
	r.new_row = new_row;
	r.run_id = run_id;
	r.has_step = has_step;
	r.step_id = step_id;
	SET_VARSIZE(hash, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	orch_audit_row_hash(&r, (uint8 *) VARDATA(hash));

	b->ids[i] = Int64GetDatum(r.audit_id);
	b->keys[i] = row_key ? JsonbPGetDatum(row_key) : (Datum) 0;
	b->key_nulls[i] = row_key == NULL;
	b->olds[i] = old_row ? JsonbPGetDatum(old_row) : (Datum) 0;
	b->old_nulls[i] = old_row == NULL;
	b->news[i] = new_row ? JsonbPGetDatum(new_row) : (Datum) 0;
	b->new_nulls[i] = new_row == NULL;
	if (run_id != NULL)
	{
		pg_uuid_t  *u = palloc(sizeof(pg_uuid_t));

		memcpy(u, run_id, sizeof(pg_uuid_t));
		b->runs[i] = UUIDPGetDatum(u);
	}
	b->run_nulls[i] = run_id == NULL;
	b->steps[i] = Int64GetDatum(step_id);
	b->step_nulls[i] = !has_step;
	b->hashes[i] = PointerGetDatum(hash);
	b->n++;
	MemoryContextSwitchTo(oldcxt);
	if (b->n == AUDIT_FLUSH_ROWS)
		batch_flush(b);
}

/* Read a transition table from its start with a read pointer of our own. */
static void
transition_rescan(Tuplestorestate *ts)
{
	int			ptr = tuplestore_alloc_read_pointer(ts, 0);

	tuplestore_select_read_pointer(ts, ptr);
	tuplestore_rescan(ts);
}

/* The run and step a row belongs to: its own columns, else the running step. */
static void
row_context(RelRender *rr, TupleTableSlot *slot, bool own, pg_uuid_t **run_id,
			bool *has_step, int64 *step_id)
{
	bool		isnull;
	Datum		d;

	*run_id = NULL;
	*has_step = false;
	*step_id = 0;
	if (own && rr->run_attr > 0)
	{
		d = slot_getattr(slot, rr->run_attr, &isnull);
		if (!isnull)
			*run_id = DatumGetUUIDP(d);
	}
	if (own && rr->step_attr > 0)
	{
		d = slot_getattr(slot, rr->step_attr, &isnull);
		if (!isnull)
		{
			*has_step = true;
			*step_id = DatumGetInt64(d);
		}
	}
	if (*run_id == NULL && !*has_step && step_context_set)
	{
		*run_id = &step_context_run;
		*has_step = true;
		*step_id = step_context_step;
	}
}

/*
 * orch._audit(): the AFTER ... FOR EACH STATEMENT trigger of an audited
 * table, with its transition tables.  With the argument 'own' (the
 * orchestrator's own tables), each row's run and step come from its
 * run_id and step_id columns; in business tables, from the step whose
 * function made the change.
 */
PG_FUNCTION_INFO_V1(orch_audit_trigger);
Datum
orch_audit_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Relation	rel;
	bool		own;
	const char *operation;
	Tuplestorestate *rows_a;	/* old rows (UPDATE, DELETE), else new ones */
	Tuplestorestate *rows_b;	/* new rows of an UPDATE */
	TupleTableSlot *slot_a;
	TupleTableSlot *slot_b = NULL;
	RelRender	rr;
	AuditBatch *b;
	MemoryContext cxt;
	MemoryContext oldcxt;
	int			nest_level;
	char	   *table_name;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("orch._audit() must be an AFTER ... FOR EACH STATEMENT trigger"),
				 errhint("Use orch.enable_audit(table) to audit a table.")));
	rel = td->tg_relation;
	own = td->tg_trigger->tgnargs > 0 && strcmp(td->tg_trigger->tgargs[0], "own") == 0;

	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		operation = "INSERT";
		rows_a = td->tg_newtable;
		rows_b = NULL;
	}
	else if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		operation = "UPDATE";
		rows_a = td->tg_oldtable;
		rows_b = td->tg_newtable;
	}
	else if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		operation = "DELETE";
		rows_a = td->tg_oldtable;
		rows_b = NULL;
	}
	else
	{
		operation = "TRUNCATE";
		rows_a = rows_b = NULL;
	}
	if (strcmp(operation, "TRUNCATE") != 0 &&
		(rows_a == NULL || (strcmp(operation, "UPDATE") == 0 && rows_b == NULL)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("orch._audit() on %s needs the statement's transition tables",
						RelationGetRelationName(rel)),
				 errhint("Use orch.enable_audit(table) to audit a table.")));
	if (rows_a != NULL && tuplestore_tuple_count(rows_a) == 0)
		return PointerGetDatum(NULL);

	cxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit",
								ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(cxt);
	b = palloc0(sizeof(AuditBatch));
	b->rows_cxt = AllocSetContextCreate(cxt, "orchestrator audit rows", ALLOCSET_DEFAULT_SIZES);
	table_name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
											RelationGetRelationName(rel));
	batch_begin_stmt(b, table_name, operation);

	if (rows_a == NULL)
	{
		/* TRUNCATE: one event, no rows */
		pg_uuid_t  *run_id = step_context_set ? &step_context_run : NULL;

		batch_add(b, NULL, NULL, NULL, run_id, step_context_set, step_context_step);
		batch_flush(b);
		MemoryContextSwitchTo(oldcxt);
		MemoryContextDelete(cxt);
		return PointerGetDatum(NULL);
	}

	rel_render_init(&rr, rel);
	slot_a = MakeSingleTupleTableSlot(rr.desc, &TTSOpsMinimalTuple);
	transition_rescan(rows_a);
	if (rows_b != NULL)
	{
		slot_b = MakeSingleTupleTableSlot(rr.desc, &TTSOpsMinimalTuple);
		transition_rescan(rows_b);
	}

	nest_level = render_settings_push();
	while (tuplestore_gettupleslot(rows_a, true, false, slot_a))
	{
		MemoryContext rowcxt = MemoryContextSwitchTo(b->rows_cxt);
		Jsonb	   *key;
		Jsonb	   *old_row = NULL;
		Jsonb	   *new_row = NULL;
		pg_uuid_t  *run_id;
		bool		has_step;
		int64		step_id;
		TupleTableSlot *current = slot_a;	/* the row as it is now, or was last */

		CHECK_FOR_INTERRUPTS();
		if (slot_b != NULL)
		{
			/* the two transition tables list an UPDATE's rows in the same order */
			if (!tuplestore_gettupleslot(rows_b, true, false, slot_b))
				elog(ERROR, "the transition tables of an UPDATE differ in length");
			current = slot_b;
			old_row = render_row(&rr, slot_a, RENDER_CHANGED, slot_b);
			new_row = render_row(&rr, slot_b, RENDER_CHANGED, slot_a);
		}
		else if (strcmp(operation, "INSERT") == 0)
			new_row = render_row(&rr, slot_a, RENDER_ALL, NULL);
		else
			old_row = render_row(&rr, slot_a, RENDER_ALL, NULL);
		key = bms_is_empty(rr.key_attrs) ? NULL : render_row(&rr, current, RENDER_KEY, NULL);
		row_context(&rr, current, own, &run_id, &has_step, &step_id);
		MemoryContextSwitchTo(rowcxt);
		batch_add(b, key, old_row, new_row, run_id, has_step, step_id);
	}
	AtEOXact_GUC(true, nest_level);
	batch_flush(b);

	ExecDropSingleTupleTableSlot(slot_a);
	if (slot_b != NULL)
		ExecDropSingleTupleTableSlot(slot_b);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(cxt);
	return PointerGetDatum(NULL);
}

/*
 * orch._audit_append_only(): refuses UPDATE, DELETE and TRUNCATE of the
 * audit tables, for every role (the trigger fires ALWAYS), but for
 * orch.purge_audit removing sealed ranges.
 */
PG_FUNCTION_INFO_V1(orch_audit_append_only);
Datum
orch_audit_append_only(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	const char *what;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "orch._audit_append_only() must be called as a trigger");
	if (orch_audit_purging && TRIGGER_FIRED_BY_DELETE(td->tg_event))
		return PointerGetDatum(NULL);
	what = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? "UPDATE" :
		TRIGGER_FIRED_BY_DELETE(td->tg_event) ? "DELETE" : "TRUNCATE";
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("%s of %s is not allowed: the audit trail is append-only", what,
					quote_qualified_identifier(get_namespace_name(RelationGetNamespace(td->tg_relation)),
											   RelationGetRelationName(td->tg_relation))),
			 errhint("Sealed ranges can be removed with orch.purge_audit, which keeps their block hashes.")));
	PG_RETURN_NULL();
}

/*
 * orch._audit_event(table_name, operation, detail): an audit row for an
 * event that changes no row of its own (enabling or disabling the audit
 * of a table, a purge); detail goes in new_row.
 */
PG_FUNCTION_INFO_V1(orch_audit_event);
Datum
orch_audit_event(PG_FUNCTION_ARGS)
{
	AuditBatch *b;
	MemoryContext cxt;
	MemoryContext oldcxt;
	Jsonb	   *detail;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("an audit event needs a table name and an operation")));
	cxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit",
								ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(cxt);
	b = palloc0(sizeof(AuditBatch));
	b->rows_cxt = AllocSetContextCreate(cxt, "orchestrator audit rows", ALLOCSET_DEFAULT_SIZES);
	batch_begin_stmt(b, text_to_cstring(PG_GETARG_TEXT_PP(0)), text_to_cstring(PG_GETARG_TEXT_PP(1)));
	detail = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P_COPY(2);
	batch_add(b, NULL, NULL, detail, step_context_set ? &step_context_run : NULL,
			  step_context_set, step_context_step);
	batch_flush(b);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(cxt);
	PG_RETURN_VOID();
}
