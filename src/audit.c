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

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/resowner.h"
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

/*
 * The encoding is written with these rather than appendStringInfo*: a row
 * is dozens of small appends, and they check for room inline.  The
 * buffer is not kept NUL-terminated; it is hashed by its length.
 */
static inline void
reserve(StringInfo buf, int n)
{
	if (buf->len + n >= buf->maxlen)
		enlargeStringInfo(buf, n);
}

static inline void
put_byte(StringInfo buf, char c)
{
	reserve(buf, 1);
	buf->data[buf->len++] = c;
}

static inline void
put_raw(StringInfo buf, const char *data, int len)
{
	reserve(buf, len);
	memcpy(buf->data + buf->len, data, len);
	buf->len += len;
}

static inline void
put_u32(StringInfo buf, uint32 v)
{
	unsigned char *p;

	reserve(buf, 4);
	p = (unsigned char *) buf->data + buf->len;
	p[0] = (unsigned char) (v >> 24);
	p[1] = (unsigned char) (v >> 16);
	p[2] = (unsigned char) (v >> 8);
	p[3] = (unsigned char) v;
	buf->len += 4;
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
	put_byte(buf, 1);
	put_u32(buf, len);
	put_raw(buf, data, (int) len);
}

/* A NULL field: 0x00 alone. */
static void
enc_null(StringInfo buf)
{
	put_byte(buf, 0);
}

static void
enc_u64(StringInfo buf, uint64 v)
{
	put_byte(buf, 1);
	put_u32(buf, 8);
	put_u64(buf, v);
}

/*
 * Text in UTF-8, as the encoding takes it, whatever the database's encoding
 * (in a SQL_ASCII database, the bytes as stored).  Returns s itself when it
 * needs no conversion.
 */
static const char *
utf8(const char *s, int len, int *outlen)
{
	char	   *c;

	if (GetDatabaseEncoding() == PG_UTF8 || GetDatabaseEncoding() == PG_SQL_ASCII)
	{
		*outlen = len;
		return s;
	}
	c = pg_server_to_any(s, len, PG_UTF8);
	*outlen = c == s ? len : (int) strlen(c);
	return c;
}

static void
enc_cstring(StringInfo buf, const char *s)
{
	int			len;
	const char *u;

	if (s == NULL)
	{
		enc_null(buf);
		return;
	}
	u = utf8(s, (int) strlen(s), &len);
	enc_bytes(buf, u, (uint32) len);
}

/* A length (4 bytes) and the UTF-8 bytes of a string of the database. */
static void
put_string(StringInfo out, const char *s, int len)
{
	int			ulen;
	const char *u = utf8(s, len, &ulen);

	put_u32(out, (uint32) ulen);
	put_raw(out, u, ulen);
}

/* A JSON number: 'N', then its text as numeric_out writes it. */
static void
put_number(StringInfo out, Numeric num)
{
	char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(num)));
	int			len = (int) strlen(s);

	put_byte(out, 'N');
	put_u32(out, (uint32) len);
	put_raw(out, s, len);
	pfree(s);
}

static void json_canon(StringInfo out, const JsonbContainer *jc);

/*
 * One key's value or one element: a tag byte, then for strings and numbers
 * a length and bytes; or a container.
 */
static void
json_entry(StringInfo out, JEntry entry, const char *base, uint32 offset, uint32 len)
{
	switch (entry & JENTRY_TYPEMASK)
	{
		case JENTRY_ISNULL:
			put_byte(out, 'Z');
			break;
		case JENTRY_ISBOOL_FALSE:
			put_byte(out, 'F');
			break;
		case JENTRY_ISBOOL_TRUE:
			put_byte(out, 'T');
			break;
		case JENTRY_ISSTRING:
			put_byte(out, 'S');
			put_string(out, base + offset, (int) len);
			break;
		case JENTRY_ISNUMERIC:
			put_number(out, (Numeric) (base + INTALIGN(offset)));
			break;
		case JENTRY_ISCONTAINER:
			json_canon(out, (const JsonbContainer *) (base + INTALIGN(offset)));
			break;
		default:
			elog(ERROR, "unexpected jsonb entry type %u in an audit row",
				 (unsigned) (entry & JENTRY_TYPEMASK));
	}
}

/*
 * A jsonb container in canonical form: objects as 'O', their number of keys
 * and each key (length, bytes) with its value, in jsonb's key order (shorter
 * keys first, then bytewise); arrays as 'A', their length and elements; a
 * raw scalar as the scalar alone.
 *
 * The container is read in its binary form (utils/jsonb.h): a header with
 * the count and kind, one JEntry per key and value (an object's keys first,
 * then its values), then their data.  A JEntry holds the length of its datum
 * or, every JB_OFFSET_STRIDE entries, its end offset; numbers and nested
 * containers start at an int-aligned offset.  Walking it directly spares
 * JsonbIterator's copy of every value.
 */
static void
json_canon(StringInfo out, const JsonbContainer *jc)
{
	uint32		count = jc->header & JB_CMASK;
	bool		is_object = (jc->header & JB_FOBJECT) != 0;
	uint32		nentries = is_object ? count * 2 : count;
	const char *base = (const char *) &jc->children[nentries];
	uint32		local[65];
	uint32	   *offs = nentries < lengthof(local) ? local : palloc(sizeof(uint32) * (nentries + 1));

	/* where each entry's datum starts; offs[nentries] is the end */
	offs[0] = 0;
	for (uint32 i = 0; i < nentries; i++)
	{
		JEntry		entry = jc->children[i];

		offs[i + 1] = JBE_HAS_OFF(entry) ? JBE_OFFLENFLD(entry) : offs[i] + JBE_OFFLENFLD(entry);
	}

	if (is_object)
	{
		put_byte(out, 'O');
		put_u32(out, count);
		for (uint32 i = 0; i < count; i++)
		{
			uint32		v = count + i;

			put_string(out, base + offs[i], (int) (offs[i + 1] - offs[i]));
			json_entry(out, jc->children[v], base, offs[v], offs[v + 1] - offs[v]);
		}
	}
	else
	{
		if (!(jc->header & JB_FSCALAR))
		{
			put_byte(out, 'A');
			put_u32(out, count);
		}
		for (uint32 i = 0; i < count; i++)
			json_entry(out, jc->children[i], base, offs[i], offs[i + 1] - offs[i]);
	}
	if (offs != local)
		pfree(offs);
}

/* A jsonb field: its canonical form, length-prefixed like any field. */
static void
enc_jsonb(StringInfo buf, Jsonb *jb)
{
	int			len_at;
	uint32		len;

	if (jb == NULL)
	{
		enc_null(buf);
		return;
	}
	put_byte(buf, 1);
	len_at = buf->len;
	put_u32(buf, 0);			/* the length, filled in below */
	json_canon(buf, &jb->root);
	len = (uint32) (buf->len - len_at - 4);
	buf->data[len_at] = (char) (len >> 24);
	buf->data[len_at + 1] = (char) (len >> 16);
	buf->data[len_at + 2] = (char) (len >> 8);
	buf->data[len_at + 3] = (char) len;
}

/* Microseconds since 1970-01-01 00:00 UTC. */
static int64
unix_usecs(TimestampTz t)
{
	return t + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
}

/*
 * One SHA-256 context serves the backend for its life: creating one sets up
 * OpenSSL state and registers it with a resource owner, which for the
 * nodes of a Merkle tree costs more than their hashing.  It is registered
 * with a resource owner of its own that is never released.
 */
static pg_cryptohash_ctx *sha256_ctx = NULL;

void
orch_sha256(const void *data, size_t len, uint8 *out)
{
	if (sha256_ctx == NULL)
	{
		static ResourceOwner owner = NULL;
		ResourceOwner saved = CurrentResourceOwner;

		if (owner == NULL)
			owner = ResourceOwnerCreate(NULL, "orchestrator SHA-256");
		CurrentResourceOwner = owner;
		sha256_ctx = pg_cryptohash_create(PG_SHA256);
		CurrentResourceOwner = saved;
		if (sha256_ctx == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory")));
	}
	if (pg_cryptohash_init(sha256_ctx) < 0 ||
		pg_cryptohash_update(sha256_ctx, data, len) < 0 ||
		pg_cryptohash_final(sha256_ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(sha256_ctx));
}

/* The canonical encoding of an audit row (version 1) and its SHA-256. */
void
orch_audit_row_hash(const OrchAuditRow *r, uint8 *out)
{
	StringInfoData buf;

	initStringInfo(&buf);
	put_byte(&buf, ORCH_AUDIT_ENCODING_VERSION);
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
	put_byte(&buf, ORCH_AUDIT_ENCODING_VERSION);
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
typedef enum RenderKind
{
	RK_TO_JSONB,				/* to_jsonb, under render_settings */
	RK_INTEGER,					/* int2, int4, int8: a number */
	RK_NUMERIC,
	RK_BOOL,
	RK_TEXT,					/* text, varchar: a string of its bytes */
	RK_OUTPUT,					/* uuid, enums: a string of their output */
	RK_JSONB,
	RK_TIMESTAMPTZ				/* ISO 8601 in UTC */
} RenderKind;

typedef struct RelRender
{
	TupleDesc	desc;
	RenderKind *kind;			/* per attribute */
	Oid		   *base_type;		/* per attribute: the type under any domain */
	FmgrInfo   *output;			/* per attribute, for RK_OUTPUT */
	int			settings_level; /* GUC nest level of render_settings, or 0 */
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
	rr->kind = palloc0(sizeof(RenderKind) * desc->natts);
	rr->base_type = palloc0(sizeof(Oid) * desc->natts);
	rr->output = palloc0(sizeof(FmgrInfo) * desc->natts);
	rr->settings_level = 0;
	rr->to_jsonb = palloc0(sizeof(FmgrInfo) * desc->natts);
	rr->key_attrs = NULL;
	rr->run_attr = 0;
	rr->step_attr = 0;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		Oid			base;

		if (att->attisdropped)
			continue;
		/* the common types directly; the others as to_jsonb renders them */
		base = getBaseType(att->atttypid);
		rr->base_type[i] = base;
		switch (base)
		{
			case INT2OID:
			case INT4OID:
			case INT8OID:
				rr->kind[i] = RK_INTEGER;
				break;
			case NUMERICOID:
				rr->kind[i] = RK_NUMERIC;
				break;
			case BOOLOID:
				rr->kind[i] = RK_BOOL;
				break;
			case TEXTOID:
			case VARCHAROID:
				rr->kind[i] = RK_TEXT;
				break;
			case JSONBOID:
				rr->kind[i] = RK_JSONB;
				break;
			case TIMESTAMPTZOID:
				rr->kind[i] = RK_TIMESTAMPTZ;
				break;
			default:
				rr->kind[i] = base == UUIDOID || type_is_enum(base) ? RK_OUTPUT : RK_TO_JSONB;
				break;
		}
		if (rr->kind[i] == RK_OUTPUT)
		{
			Oid			outfn;
			bool		varlena;

			getTypeOutputInfo(base, &outfn, &varlena);
			fmgr_info(outfn, &rr->output[i]);
		}
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
	switch (rr->kind[i])
	{
		case RK_INTEGER:
			val.type = jbvNumeric;
			val.val.numeric = int64_to_numeric(rr->base_type[i] == INT2OID ? DatumGetInt16(value) :
											   rr->base_type[i] == INT4OID ? DatumGetInt32(value) :
											   DatumGetInt64(value));
			(void) pushJsonbValue(state, WJB_VALUE, &val);
			return;
		case RK_NUMERIC:
			if (numeric_is_nan(DatumGetNumeric(value)) || numeric_is_inf(DatumGetNumeric(value)))
				break;			/* not a JSON number: as to_jsonb has it */
			val.type = jbvNumeric;
			val.val.numeric = DatumGetNumeric(value);
			(void) pushJsonbValue(state, WJB_VALUE, &val);
			return;
		case RK_BOOL:
			val.type = jbvBool;
			val.val.boolean = DatumGetBool(value);
			(void) pushJsonbValue(state, WJB_VALUE, &val);
			return;
		case RK_TEXT:
			{
				text	   *t = DatumGetTextPP(value);

				val.type = jbvString;
				val.val.string.val = VARDATA_ANY(t);
				val.val.string.len = (int) VARSIZE_ANY_EXHDR(t);
				(void) pushJsonbValue(state, WJB_VALUE, &val);
				return;
			}
		case RK_OUTPUT:
			val.type = jbvString;
			val.val.string.val = OutputFunctionCall(&rr->output[i], value);
			val.val.string.len = (int) strlen(val.val.string.val);
			(void) pushJsonbValue(state, WJB_VALUE, &val);
			return;
		case RK_TIMESTAMPTZ:
			{
				static const int utc = 0;

				val.type = jbvString;
				val.val.string.val = JsonEncodeDateTime(NULL, value, TIMESTAMPTZOID, &utc);
				val.val.string.len = (int) strlen(val.val.string.val);
				(void) pushJsonbValue(state, WJB_VALUE, &val);
				return;
			}
		case RK_JSONB:
		case RK_TO_JSONB:
			break;
	}
	if (rr->kind[i] != RK_JSONB && rr->settings_level == 0)
		rr->settings_level = render_settings_push();	/* until the statement's rows are done */
	{
		Jsonb	   *jb = rr->kind[i] == RK_JSONB ? DatumGetJsonbP(value) :
			DatumGetJsonbP(FunctionCall1(&rr->to_jsonb[i], value));

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
		struct varlena *pa = (struct varlena *) DatumGetPointer(a);
		struct varlena *pb = (struct varlena *) DatumGetPointer(b);
		struct varlena *va;
		struct varlena *vb;
		bool		changed;

		/* an UPDATE that leaves a toasted value alone keeps its pointer */
		if (VARATT_IS_EXTERNAL_ONDISK(pa) && VARATT_IS_EXTERNAL_ONDISK(pb) &&
			VARSIZE_EXTERNAL(pa) == VARSIZE_EXTERNAL(pb) &&
			memcmp(pa, pb, VARSIZE_EXTERNAL(pa)) == 0)
			return false;
		va = PG_DETOAST_DATUM_PACKED(a);
		vb = PG_DETOAST_DATUM_PACKED(b);
		changed = VARSIZE_ANY_EXHDR(va) != VARSIZE_ANY_EXHDR(vb) ||
			memcmp(VARDATA_ANY(va), VARDATA_ANY(vb), VARSIZE_ANY_EXHDR(va)) != 0;
		if (va != pa)
			pfree(va);
		if (vb != pb)
			pfree(vb);
		return changed;
	}
	return !datumIsEqual(a, b, att->attbyval, att->attlen);
}

/* Which columns an UPDATE changed: changed[i] for attribute i. */
static void
changed_columns(RelRender *rr, TupleTableSlot *before, TupleTableSlot *after, bool *changed)
{
	slot_getallattrs(before);
	slot_getallattrs(after);
	for (int i = 0; i < rr->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(rr->desc, i);

		changed[i] = !att->attisdropped &&
			column_changed(att, before->tts_values[i], before->tts_isnull[i],
						   after->tts_values[i], after->tts_isnull[i]);
	}
}

static Jsonb *
render_row(RelRender *rr, TupleTableSlot *slot, RenderWhich which, const bool *changed)
{
	JsonbParseState *state = NULL;
	JsonbValue *res;

	slot_getallattrs(slot);
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < rr->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(rr->desc, i);

		if (att->attisdropped)
			continue;
		if (which == RENDER_KEY && !bms_is_member(att->attnum, rr->key_attrs))
			continue;
		if (which == RENDER_CHANGED && !changed[i])
			continue;
		push_column(&state, rr, i, slot->tts_values[i], slot->tts_isnull[i]);
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/* ------------------------------------------------------------------------
 * Writing audit rows
 * ------------------------------------------------------------------------ */

static Oid	audit_seq = InvalidOid;	/* audit_id's sequence ... */
static Oid	audit_seq_of = InvalidOid;	/* ... of this orch.audit_log */

/* The values of one audit row but those common to its statement. */
typedef struct AuditPending
{
	Datum		id;
	Datum		key;
	Datum		old;
	Datum		new;
	Datum		run;
	Datum		step;
	Datum		hash;
	bool		key_null;
	bool		old_null;
	bool		new_null;
	bool		run_null;
	bool		step_null;
} AuditPending;

/*
 * Audit rows of one statement (or one event), written in chunks of at most
 * cap rows: as many as the statement changed, up to AUDIT_FLUSH_ROWS.
 */
typedef struct AuditBatch
{
	OrchAuditRow common;		/* xid, at, table, operation, who, reason */
	int			n;
	int			cap;
	AuditPending *rows;
	MemoryContext rows_cxt;		/* the chunk's values */
} AuditBatch;

/*
 * Where orch.audit_log's columns are in a tuple descriptor of it, in the
 * order of the encoding: audit_id, xid, at, table_name, operation, row_key,
 * old_row, new_row, actor, db_user, session_role, run_id, step_id, reason,
 * and row_hash last.
 */
void
orch_audit_column_map(TupleDesc desc, int *col)
{
	static const char *const names[ORCH_AUDIT_NCOLS] = {
		"audit_id", "xid", "at", "table_name", "operation", "row_key", "old_row", "new_row",
		"actor", "db_user", "session_role", "run_id", "step_id", "reason", "row_hash"
	};

	for (int c = 0; c < ORCH_AUDIT_NCOLS; c++)
	{
		col[c] = -1;
		for (int a = 0; a < desc->natts; a++)
			if (!TupleDescAttr(desc, a)->attisdropped &&
				strcmp(NameStr(TupleDescAttr(desc, a)->attname), names[c]) == 0)
				col[c] = a;
		if (col[c] < 0)
			elog(ERROR, "orch.audit_log has no column %s", names[c]);
	}
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
 * Write the batch's rows to orch.audit_log, as COPY does: one multi-insert
 * (a WAL record per page, not per row), then their index entries.  No
 * trigger, rule or privilege check stands between: the user whose change
 * is recorded may not write to the audit trail, and its only triggers
 * refuse updates and deletes.
 */
static void
batch_flush(AuditBatch *b)
{
	Relation	rel;
	TupleDesc	desc;
	ResultRelInfo *rri;
	EState	   *estate;
	TupleTableSlot **slots;
	BulkInsertState bis;
	CommandId	cid = GetCurrentCommandId(true);
	int			col[ORCH_AUDIT_NCOLS];
	Datum		xid;
	Datum		at;
	Datum		table_name;
	Datum		operation;
	Datum		actor;
	Datum		db_user;
	Datum		session_role;
	Datum		reason;

	if (b->n == 0)
		return;

	rel = table_open(audit_log_relid(), RowExclusiveLock);
	desc = RelationGetDescr(rel);
	orch_audit_column_map(desc, col);

	xid = FullTransactionIdGetDatum(FullTransactionIdFromU64(b->common.xid));
	at = TimestampTzGetDatum(b->common.at);
	table_name = CStringGetTextDatum(b->common.table_name);
	operation = CStringGetTextDatum(b->common.operation);
	actor = b->common.actor ? CStringGetTextDatum(b->common.actor) : (Datum) 0;
	db_user = CStringGetTextDatum(b->common.db_user);
	session_role = CStringGetTextDatum(b->common.session_role);
	reason = b->common.reason ? CStringGetTextDatum(b->common.reason) : (Datum) 0;

	estate = CreateExecutorState();
	estate->es_output_cid = cid;
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);

	slots = palloc(sizeof(TupleTableSlot *) * b->n);
	for (int i = 0; i < b->n; i++)
	{
		TupleTableSlot *slot = table_slot_create(rel, &estate->es_tupleTable);
		Datum	   *v = slot->tts_values;
		bool	   *isnull = slot->tts_isnull;
		AuditPending *p = &b->rows[i];

		ExecClearTuple(slot);
		memset(isnull, true, sizeof(bool) * desc->natts);
#define SET(c, d, nul) (v[col[c]] = (d), isnull[col[c]] = (nul))
		SET(0, p->id, false);
		SET(1, xid, false);
		SET(2, at, false);
		SET(3, table_name, false);
		SET(4, operation, false);
		SET(5, p->key, p->key_null);
		SET(6, p->old, p->old_null);
		SET(7, p->new, p->new_null);
		SET(8, actor, b->common.actor == NULL);
		SET(9, db_user, false);
		SET(10, session_role, false);
		SET(11, p->run, p->run_null);
		SET(12, p->step, p->step_null);
		SET(13, reason, b->common.reason == NULL);
		SET(14, p->hash, false);
#undef SET
		ExecStoreVirtualTuple(slot);
		slots[i] = slot;
	}

	bis = GetBulkInsertState();
	table_multi_insert(rel, slots, b->n, cid, 0, bis);
	FreeBulkInsertState(bis);
	for (int i = 0; i < b->n; i++)
	{
		List	   *recheck = ExecInsertIndexTuples(rri, slots[i], estate, false, false, NULL, NIL);

		list_free(recheck);
		ResetPerTupleExprContext(estate);
	}

	ExecCloseIndices(rri);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	table_close(rel, NoLock);

	b->n = 0;
	MemoryContextReset(b->rows_cxt);
}

/*
 * current_user; but inside one of the orchestrator's SECURITY DEFINER
 * functions (current_user is then the owner of schema orch), the role that
 * called it, which is who the change is made for.
 */
static Oid
acting_user(void)
{
	Oid			user = GetUserId();
	HeapTuple	tp = SearchSysCache1(NAMESPACEOID,
									 ObjectIdGetDatum(get_namespace_oid("orch", false)));
	Oid			orch_owner;

	if (!HeapTupleIsValid(tp))
		return user;
	orch_owner = ((Form_pg_namespace) GETSTRUCT(tp))->nspowner;
	ReleaseSysCache(tp);
	return user == orch_owner && GetOuterUserId() != user ? GetOuterUserId() : user;
}

/* Who, when and why, for every row of a statement that changed nrows rows. */
static void
batch_begin_stmt(AuditBatch *b, const char *table_name, const char *operation, int64 nrows)
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
	b->common.db_user = GetUserNameFromId(acting_user(), false);
	b->common.session_role = GetUserNameFromId(GetSessionUserId(), false);
	b->n = 0;
	b->cap = (int) Min(Max(nrows, 1), AUDIT_FLUSH_ROWS);
	b->rows = palloc(sizeof(AuditPending) * b->cap);
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
	AuditPending *p = &b->rows[b->n];

	r.audit_id = nextval_internal(audit_seq, false);
	r.row_key = row_key;
	r.old_row = old_row;
	r.new_row = new_row;
	r.run_id = run_id;
	r.has_step = has_step;
	r.step_id = step_id;
	SET_VARSIZE(hash, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	orch_audit_row_hash(&r, (uint8 *) VARDATA(hash));

	p->id = Int64GetDatum(r.audit_id);
	p->key = row_key ? JsonbPGetDatum(row_key) : (Datum) 0;
	p->key_null = row_key == NULL;
	p->old = old_row ? JsonbPGetDatum(old_row) : (Datum) 0;
	p->old_null = old_row == NULL;
	p->new = new_row ? JsonbPGetDatum(new_row) : (Datum) 0;
	p->new_null = new_row == NULL;
	p->run = (Datum) 0;
	if (run_id != NULL)
	{
		pg_uuid_t  *u = palloc(sizeof(pg_uuid_t));

		memcpy(u, run_id, sizeof(pg_uuid_t));
		p->run = UUIDPGetDatum(u);
	}
	p->run_null = run_id == NULL;
	p->step = Int64GetDatum(step_id);
	p->step_null = !has_step;
	p->hash = PointerGetDatum(hash);
	b->n++;
	MemoryContextSwitchTo(oldcxt);
	if (b->n == b->cap)
		batch_flush(b);
}

/* Read a transition table from its start with a read pointer of our own. */
static void
transition_rescan(Tuplestorestate *ts)
{
	int			ptr = tuplestore_alloc_read_pointer(ts, EXEC_FLAG_REWIND);

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
	char	   *table_name;
	bool	   *changed;

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
						quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												   RelationGetRelationName(rel))),
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
	batch_begin_stmt(b, table_name, operation, rows_a != NULL ? tuplestore_tuple_count(rows_a) : 1);

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
	changed = palloc(sizeof(bool) * Max(rr.desc->natts, 1));
	slot_a = MakeSingleTupleTableSlot(rr.desc, &TTSOpsMinimalTuple);
	transition_rescan(rows_a);
	if (rows_b != NULL)
	{
		slot_b = MakeSingleTupleTableSlot(rr.desc, &TTSOpsMinimalTuple);
		transition_rescan(rows_b);
	}

	while (tuplestore_gettupleslot(rows_a, true, false, slot_a))
	{
		MemoryContext rowcxt;
		Jsonb	   *key;
		Jsonb	   *old_row = NULL;
		Jsonb	   *new_row = NULL;
		pg_uuid_t  *run_id;
		bool		has_step;
		int64		step_id;
		TupleTableSlot *current = slot_a;	/* the row as it is now, or was last */

		CHECK_FOR_INTERRUPTS();
		/*
		 * The two transition tables list an UPDATE's rows in the same order.
		 * Read in this context: a tuple read back from a transition table
		 * that went to disk belongs to its slot until the next read, and the
		 * rows' context is reset at every flush.
		 */
		if (slot_b != NULL && !tuplestore_gettupleslot(rows_b, true, false, slot_b))
			ereport(ERROR,
					(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
					 errmsg("the transition tables of an UPDATE of %s differ in length", table_name),
					 errhint("The audit trail pairs each updated row with its old version.")));
		rowcxt = MemoryContextSwitchTo(b->rows_cxt);
		if (slot_b != NULL)
		{
			current = slot_b;
			changed_columns(&rr, slot_a, slot_b, changed);
			old_row = render_row(&rr, slot_a, RENDER_CHANGED, changed);
			new_row = render_row(&rr, slot_b, RENDER_CHANGED, changed);
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
	if (rr.settings_level > 0)
		AtEOXact_GUC(true, rr.settings_level);
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
	batch_begin_stmt(b, text_to_cstring(PG_GETARG_TEXT_PP(0)), text_to_cstring(PG_GETARG_TEXT_PP(1)), 1);
	detail = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P_COPY(2);
	batch_add(b, NULL, NULL, detail, step_context_set ? &step_context_run : NULL,
			  step_context_set, step_context_step);
	batch_flush(b);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(cxt);
	PG_RETURN_VOID();
}
