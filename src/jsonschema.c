/*-------------------------------------------------------------------------
 * jsonschema.c
 *	  The subset of JSON Schema that a step's input_schema and
 *	  output_schema are written in: type, required, properties, items,
 *	  enum, minimum, maximum, minLength, maxLength, pattern and
 *	  additionalProperties, plus the annotations title, description and
 *	  $comment (docs/workflows.md, "Validation").
 *
 *	  A schema is checked once, when its workflow is defined
 *	  (orch._schema_problem); values are then checked against it whenever
 *	  a step gets its input or produces its output (orch_schema_first_violation),
 *	  and by orch.validate_json for applications.  Every violation names
 *	  the JSON path of the offending value, in SQL/JSON path syntax.
 *
 *	  A pattern is a PostgreSQL (advanced) regular expression, matched
 *	  anywhere in the string as JSON Schema's are; lengths are counted in
 *	  characters; "integer" is a number without a fractional part (1.0 is
 *	  one).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_collation.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "regex/regex.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "orchestrator.h"

/* violations reported at most, per value */
#define MAX_VIOLATIONS 100

typedef struct Violations
{
	List	   *paths;			/* char * */
	List	   *messages;		/* char * */
	int			max;			/* stop after this many */
} Violations;

static const char *const type_names[] = {
	"object", "array", "string", "number", "integer", "boolean", "null", NULL
};

static const char *const keywords[] = {
	"type", "required", "properties", "items", "enum", "minimum", "maximum",
	"minLength", "maxLength", "pattern", "additionalProperties",
	"title", "description", "$comment", NULL
};

/* ------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------ */

static char *vformat(const char *fmt, va_list args) pg_attribute_printf(1, 0);

/* A message formatted into palloc'd memory. */
static char *
vformat(const char *fmt, va_list args)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (;;)
	{
		va_list		copy;
		int			needed;

		va_copy(copy, args);
		needed = appendStringInfoVA(&buf, fmt, copy);
		va_end(copy);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	return buf.data;
}

/* The root of a jsonb as a value: a scalar, or its container. */
static void
root_value(Jsonb *jb, JsonbValue *out)
{
	if (JB_ROOT_IS_SCALAR(jb))
	{
		JsonbValue *v = getIthJsonbValueFromContainer(&jb->root, 0);

		*out = *v;
		return;
	}
	out->type = jbvBinary;
	out->val.binary.data = &jb->root;
	out->val.binary.len = VARSIZE(jb) - VARHDRSZ;
}

static bool
is_object(const JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data);
}

static bool
is_array(const JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data);
}

static const char *
json_type_of(const JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvBool:
			return "boolean";
		case jbvNumeric:
			return "number";
		case jbvString:
			return "string";
		case jbvBinary:
			return JsonContainerIsObject(v->val.binary.data) ? "object" : "array";
		default:
			return "unknown";
	}
}

/* A keyword of a schema object, or NULL. */
static JsonbValue *
keyword(JsonbContainer *schema, const char *name)
{
	return getKeyJsonValueFromContainer(schema, name, strlen(name), NULL);
}

/* A value as JSON text, cut short if long, for messages. */
static char *
json_text(const JsonbValue *v)
{
	Jsonb	   *jb = JsonbValueToJsonb((JsonbValue *) v);
	char	   *s = JsonbToCString(NULL, &jb->root, VARSIZE(jb));

	if (strlen(s) > 60)
	{
		int			cut = pg_mbcliplen(s, strlen(s), 57);

		s = psprintf("%.*s...", cut, s);
	}
	return s;
}

static bool
numeric_is_whole(Numeric n)
{
	Datum		t = DirectFunctionCall2(numeric_trunc, NumericGetDatum(n), Int32GetDatum(0));

	return DatumGetBool(DirectFunctionCall2(numeric_eq, NumericGetDatum(n), t));
}

static int
numeric_compare(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}

/* Append an object key to a path: .key, or ."key" when it is not a plain name. */
static void
path_key(StringInfo path, const char *key, int len)
{
	bool		plain = len > 0 && (isalpha((unsigned char) key[0]) || key[0] == '_');

	for (int i = 0; plain && i < len; i++)
		plain = isalnum((unsigned char) key[i]) || key[i] == '_';
	appendStringInfoChar(path, '.');
	if (plain)
		appendBinaryStringInfo(path, key, len);
	else
	{
		char	   *k = pnstrdup(key, len);

		escape_json(path, k);
		pfree(k);
	}
}

/* ------------------------------------------------------------------------
 * Checking a schema (when a workflow is defined)
 * ------------------------------------------------------------------------ */

typedef struct SchemaProblem
{
	StringInfoData path;		/* relative: .properties.amount.type */
	char	   *message;
} SchemaProblem;

static bool check_schema(JsonbValue *schema, SchemaProblem *p);

static bool
problem(SchemaProblem *p, const char *fmt,...) pg_attribute_printf(2, 3);

static bool
problem(SchemaProblem *p, const char *fmt,...)
{
	va_list		args;

	va_start(args, fmt);
	p->message = vformat(fmt, args);
	va_end(args);
	return false;
}

static bool
is_type_name(const JsonbValue *v)
{
	if (v->type != jbvString)
		return false;
	for (int i = 0; type_names[i]; i++)
	{
		if (strlen(type_names[i]) == (size_t) v->val.string.len &&
			strncmp(type_names[i], v->val.string.val, v->val.string.len) == 0)
			return true;
	}
	return false;
}

/* A keyword that must be a non-negative whole number. */
static bool
check_count(JsonbValue *v, const char *name, SchemaProblem *p)
{
	if (v->type != jbvNumeric || !numeric_is_whole(v->val.numeric) ||
		DatumGetBool(DirectFunctionCall2(numeric_lt, NumericGetDatum(v->val.numeric),
										 DirectFunctionCall1(int4_numeric, Int32GetDatum(0)))) ||
		DatumGetBool(DirectFunctionCall2(numeric_gt, NumericGetDatum(v->val.numeric),
										 DirectFunctionCall1(int4_numeric, Int32GetDatum(PG_INT32_MAX)))))
		return problem(p, "\"%s\" must be a whole number from 0 to %d", name, PG_INT32_MAX);
	return true;
}

static bool
check_pattern(JsonbValue *v, SchemaProblem *p)
{
	pg_wchar   *w;
	int			wlen;
	regex_t		re;
	int			rc;

	if (v->type != jbvString)
		return problem(p, "\"pattern\" must be a string");
	w = palloc((v->val.string.len + 1) * sizeof(pg_wchar));
	wlen = pg_mb2wchar_with_len(v->val.string.val, w, v->val.string.len);
	rc = pg_regcomp(&re, w, wlen, REG_ADVANCED, DEFAULT_COLLATION_OID);
	pfree(w);
	if (rc != REG_OKAY)
	{
		char		msg[256];

		pg_regerror(rc, &re, msg, sizeof(msg));
		return problem(p, "invalid regular expression in \"pattern\": %s", msg);
	}
	pg_regfree(&re);
	return true;
}

/* A keyword whose value is a schema (or, for additionalProperties, a boolean). */
static bool
check_subschema(JsonbValue *v, const char *name, SchemaProblem *p)
{
	int			len = p->path.len;

	appendStringInfo(&p->path, ".%s", name);
	if (!check_schema(v, p))
		return false;
	p->path.len = len;
	p->path.data[len] = '\0';
	return true;
}

static bool
check_schema(JsonbValue *schema, SchemaProblem *p)
{
	JsonbContainer *c;
	JsonbIterator *it;
	JsonbValue	k,
				v;
	JsonbIteratorToken tok;

	check_stack_depth();
	if (!is_object(schema))
		return problem(p, "a schema must be an object, not %s", json_type_of(schema));
	c = schema->val.binary.data;

	/* every key is a keyword of the subset */
	it = JsonbIteratorInit(c);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		bool		known = false;

		if (tok != WJB_KEY)
			continue;
		for (int i = 0; keywords[i] && !known; i++)
			known = strlen(keywords[i]) == (size_t) k.val.string.len &&
				strncmp(keywords[i], k.val.string.val, k.val.string.len) == 0;
		if (!known)
			return problem(p, "unsupported keyword \"%.*s\"", k.val.string.len, k.val.string.val);
	}

	{
		JsonbValue *t = keyword(c, "type");

		if (t != NULL && is_array(t))
		{
			int			n = JsonContainerSize(t->val.binary.data);

			if (n == 0)
				return problem(p, "\"type\" must name at least one type");
			for (int i = 0; i < n; i++)
			{
				if (!is_type_name(getIthJsonbValueFromContainer(t->val.binary.data, i)))
					return problem(p, "\"type\" must list types among object, array, string, number, integer, boolean, null");
			}
		}
		else if (t != NULL && !is_type_name(t))
			return problem(p, "\"type\" must be one of object, array, string, number, integer, boolean, null, or an array of them");
	}
	{
		JsonbValue *r = keyword(c, "required");

		if (r != NULL)
		{
			if (!is_array(r))
				return problem(p, "\"required\" must be an array of key names");
			for (int i = 0; i < (int) JsonContainerSize(r->val.binary.data); i++)
			{
				if (getIthJsonbValueFromContainer(r->val.binary.data, i)->type != jbvString)
					return problem(p, "\"required\" must be an array of key names");
			}
		}
	}
	{
		JsonbValue *props = keyword(c, "properties");

		if (props != NULL)
		{
			int			len = p->path.len;

			if (!is_object(props))
				return problem(p, "\"properties\" must be an object of schemas");
			it = JsonbIteratorInit(props->val.binary.data);
			while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
			{
				if (tok != WJB_KEY)
					continue;
				tok = JsonbIteratorNext(&it, &v, true);
				Assert(tok == WJB_VALUE);
				p->path.len = len;
				p->path.data[len] = '\0';
				appendStringInfoString(&p->path, ".properties");
				path_key(&p->path, k.val.string.val, k.val.string.len);
				if (!check_schema(&v, p))
					return false;
			}
			p->path.len = len;
			p->path.data[len] = '\0';
		}
	}
	{
		JsonbValue *items = keyword(c, "items");

		if (items != NULL && !check_subschema(items, "items", p))
			return false;
	}
	{
		JsonbValue *ap = keyword(c, "additionalProperties");

		if (ap != NULL && ap->type != jbvBool && !check_subschema(ap, "additionalProperties", p))
			return false;
	}
	{
		JsonbValue *e = keyword(c, "enum");

		if (e != NULL && (!is_array(e) || JsonContainerSize(e->val.binary.data) == 0))
			return problem(p, "\"enum\" must be a non-empty array of values");
	}
	{
		const char *bounds[] = {"minimum", "maximum"};

		for (int i = 0; i < 2; i++)
		{
			JsonbValue *b = keyword(c, bounds[i]);

			if (b != NULL && b->type != jbvNumeric)
				return problem(p, "\"%s\" must be a number", bounds[i]);
		}
	}
	{
		const char *counts[] = {"minLength", "maxLength"};

		for (int i = 0; i < 2; i++)
		{
			JsonbValue *n = keyword(c, counts[i]);

			if (n != NULL && !check_count(n, counts[i], p))
				return false;
		}
	}
	{
		JsonbValue *pat = keyword(c, "pattern");

		if (pat != NULL && !check_pattern(pat, p))
			return false;
	}
	{
		const char *texts[] = {"title", "description", "$comment"};

		for (int i = 0; i < 3; i++)
		{
			JsonbValue *t = keyword(c, texts[i]);

			if (t != NULL && t->type != jbvString)
				return problem(p, "\"%s\" must be a string", texts[i]);
		}
	}
	return true;
}

/*
 * orch._schema_problem(schema jsonb) returns text[]: NULL if the schema is
 * in the supported subset, else {path within the schema, what is wrong}.
 */
PG_FUNCTION_INFO_V1(orch_schema_problem);
Datum
orch_schema_problem(PG_FUNCTION_ARGS)
{
	Jsonb	   *schema = PG_GETARG_JSONB_P(0);
	JsonbValue	root;
	SchemaProblem p;
	Datum		parts[2];

	initStringInfo(&p.path);
	p.message = NULL;
	root_value(schema, &root);
	if (check_schema(&root, &p))
		PG_RETURN_NULL();
	parts[0] = CStringGetTextDatum(p.path.data);
	parts[1] = CStringGetTextDatum(p.message);
	PG_RETURN_ARRAYTYPE_P(construct_array(parts, 2, TEXTOID, -1, false, TYPALIGN_INT));
}

/* ------------------------------------------------------------------------
 * Checking a value against a schema
 * ------------------------------------------------------------------------ */

static bool
violation(Violations *out, StringInfo path, const char *fmt,...) pg_attribute_printf(3, 4);

/* Record a violation at path; false once enough are recorded. */
static bool
violation(Violations *out, StringInfo path, const char *fmt,...)
{
	va_list		args;

	va_start(args, fmt);
	out->messages = lappend(out->messages, vformat(fmt, args));
	va_end(args);
	out->paths = lappend(out->paths, pstrdup(path->data));
	return list_length(out->paths) < out->max;
}

static bool
type_matches_one(const JsonbValue *t, const JsonbValue *v)
{
	const char *want = t->val.string.val;
	int			len = t->val.string.len;

#define IS(name) (len == (int) strlen(name) && strncmp(want, name, len) == 0)
	if (IS("integer"))
		return v->type == jbvNumeric && numeric_is_whole(v->val.numeric);
	if (IS("number"))
		return v->type == jbvNumeric;
	if (IS("string"))
		return v->type == jbvString;
	if (IS("boolean"))
		return v->type == jbvBool;
	if (IS("null"))
		return v->type == jbvNull;
	if (IS("object"))
		return is_object(v);
	if (IS("array"))
		return is_array(v);
#undef IS
	return false;
}

static bool
type_matches(const JsonbValue *t, const JsonbValue *v, char **wanted)
{
	if (t->type == jbvString)
	{
		*wanted = pnstrdup(t->val.string.val, t->val.string.len);
		return type_matches_one(t, v);
	}
	else
	{
		StringInfoData buf;
		int			n = JsonContainerSize(t->val.binary.data);
		bool		ok = false;

		initStringInfo(&buf);
		for (int i = 0; i < n; i++)
		{
			JsonbValue *one = getIthJsonbValueFromContainer(t->val.binary.data, i);

			ok = ok || type_matches_one(one, v);
			appendStringInfo(&buf, "%s%.*s", i == 0 ? "" : (i == n - 1 ? " or " : ", "),
							 one->val.string.len, one->val.string.val);
		}
		*wanted = buf.data;
		return ok;
	}
}

/* Is v equal to one of the values of an enum? */
static bool
in_enum(const JsonbValue *e, const JsonbValue *v)
{
	Jsonb	   *vj = JsonbValueToJsonb((JsonbValue *) v);
	int			n = JsonContainerSize(e->val.binary.data);

	for (int i = 0; i < n; i++)
	{
		JsonbValue *one = getIthJsonbValueFromContainer(e->val.binary.data, i);
		Jsonb	   *oj = JsonbValueToJsonb(one);

		if (compareJsonbContainers(&vj->root, &oj->root) == 0)
			return true;
	}
	return false;
}

static bool validate(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out);

static bool
validate_string(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out)
{
	JsonbValue *kw;
	int			chars = -1;

	if ((kw = keyword(schema, "minLength")) != NULL || keyword(schema, "maxLength") != NULL)
		chars = pg_mbstrlen_with_len(v->val.string.val, v->val.string.len);
	if (kw != NULL)
	{
		int			min = DatumGetInt32(DirectFunctionCall1(numeric_int4, NumericGetDatum(kw->val.numeric)));

		if (chars < min && !violation(out, path, "length %d, less than minLength %d", chars, min))
			return false;
	}
	if ((kw = keyword(schema, "maxLength")) != NULL)
	{
		int			max = DatumGetInt32(DirectFunctionCall1(numeric_int4, NumericGetDatum(kw->val.numeric)));

		if (chars > max && !violation(out, path, "length %d, more than maxLength %d", chars, max))
			return false;
	}
	if ((kw = keyword(schema, "pattern")) != NULL)
	{
		text	   *re = cstring_to_text_with_len(kw->val.string.val, kw->val.string.len);

		if (!RE_compile_and_execute(re, v->val.string.val, v->val.string.len, REG_ADVANCED,
									DEFAULT_COLLATION_OID, 0, NULL) &&
			!violation(out, path, "%s does not match pattern \"%.*s\"", json_text(v),
					   kw->val.string.len, kw->val.string.val))
			return false;
	}
	return true;
}

static bool
validate_number(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out)
{
	JsonbValue *kw;

	if ((kw = keyword(schema, "minimum")) != NULL &&
		numeric_compare(v->val.numeric, kw->val.numeric) < 0 &&
		!violation(out, path, "%s is less than minimum %s", json_text(v), json_text(kw)))
		return false;
	if ((kw = keyword(schema, "maximum")) != NULL &&
		numeric_compare(v->val.numeric, kw->val.numeric) > 0 &&
		!violation(out, path, "%s is more than maximum %s", json_text(v), json_text(kw)))
		return false;
	return true;
}

static bool
validate_object(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out)
{
	JsonbContainer *obj = v->val.binary.data;
	JsonbValue *required = keyword(schema, "required");
	JsonbValue *props = keyword(schema, "properties");
	JsonbValue *additional = keyword(schema, "additionalProperties");
	int			len = path->len;
	JsonbIterator *it;
	JsonbValue	k,
				val;
	JsonbIteratorToken tok;

	if (required != NULL)
	{
		int			n = JsonContainerSize(required->val.binary.data);

		for (int i = 0; i < n; i++)
		{
			JsonbValue *name = getIthJsonbValueFromContainer(required->val.binary.data, i);

			if (getKeyJsonValueFromContainer(obj, name->val.string.val, name->val.string.len,
											 NULL) == NULL &&
				!violation(out, path, "missing required key \"%.*s\"",
						   name->val.string.len, name->val.string.val))
				return false;
		}
	}

	/* each key: by its schema in properties, else by additionalProperties */
	it = JsonbIteratorInit(obj);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		JsonbValue *sub = NULL;
		bool		ok = true;

		if (tok != WJB_KEY)
			continue;
		tok = JsonbIteratorNext(&it, &val, true);
		Assert(tok == WJB_VALUE);
		path->len = len;
		path->data[len] = '\0';
		path_key(path, k.val.string.val, k.val.string.len);
		if (props != NULL)
			sub = getKeyJsonValueFromContainer(props->val.binary.data, k.val.string.val,
											   k.val.string.len, NULL);
		if (sub != NULL)
			ok = validate(sub->val.binary.data, &val, path, out);
		else if (additional != NULL && additional->type == jbvBool)
		{
			if (!additional->val.boolean)
				ok = violation(out, path, "key not allowed: additionalProperties is false");
		}
		else if (additional != NULL)
			ok = validate(additional->val.binary.data, &val, path, out);
		if (!ok)
			return false;
	}
	path->len = len;
	path->data[len] = '\0';
	return true;
}

static bool
validate_array(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out)
{
	JsonbValue *items = keyword(schema, "items");
	int			len = path->len;
	JsonbIterator *it;
	JsonbValue	elem;
	JsonbIteratorToken tok;
	int			i = 0;

	if (items == NULL)
		return true;
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		path->len = len;
		path->data[len] = '\0';
		appendStringInfo(path, "[%d]", i++);
		if (!validate(items->val.binary.data, &elem, path, out))
			return false;
	}
	path->len = len;
	path->data[len] = '\0';
	return true;
}

/* Check v against schema; false once enough violations are recorded. */
static bool
validate(JsonbContainer *schema, JsonbValue *v, StringInfo path, Violations *out)
{
	JsonbValue *kw;

	check_stack_depth();
	if ((kw = keyword(schema, "type")) != NULL)
	{
		char	   *wanted;

		/* nothing else about a value of the wrong type is worth saying */
		if (!type_matches(kw, v, &wanted))
			return violation(out, path, "expected %s, got %s", wanted, json_type_of(v));
	}
	if ((kw = keyword(schema, "enum")) != NULL && !in_enum(kw, v) &&
		!violation(out, path, "%s is not one of %s", json_text(v), json_text(kw)))
		return false;
	switch (v->type)
	{
		case jbvString:
			return validate_string(schema, v, path, out);
		case jbvNumeric:
			return validate_number(schema, v, path, out);
		case jbvBinary:
			return is_object(v) ? validate_object(schema, v, path, out)
				: validate_array(schema, v, path, out);
		default:
			return true;
	}
}

static void
validate_jsonb(Jsonb *value, Jsonb *schema, int max, Violations *out)
{
	JsonbValue	root;
	StringInfoData path;

	out->paths = NIL;
	out->messages = NIL;
	out->max = max;
	root_value(value, &root);
	initStringInfo(&path);
	appendStringInfoChar(&path, '$');
	if (JB_ROOT_IS_SCALAR(schema) || !JB_ROOT_IS_OBJECT(schema))
		elog(ERROR, "a schema must be a JSON object");
	(void) validate(&schema->root, &root, &path, out);
}

/*
 * The first violation of a value against a schema (already checked by
 * orch._schema_problem): true with its path and message, false if none.
 */
bool
orch_schema_first_violation(Jsonb *value, Jsonb *schema, char **path, char **message)
{
	Violations	v;

	validate_jsonb(value, schema, 1, &v);
	if (v.paths == NIL)
		return false;
	*path = linitial(v.paths);
	*message = linitial(v.messages);
	return true;
}

/*
 * orch.validate_json(value jsonb, schema jsonb) returns setof (path, message):
 * every violation (up to 100), none if the value is valid.  An invalid
 * schema is an error naming where in it the problem is.
 */
PG_FUNCTION_INFO_V1(orch_validate_json);
Datum
orch_validate_json(PG_FUNCTION_ARGS)
{
	Jsonb	   *value = PG_GETARG_JSONB_P(0);
	Jsonb	   *schema = PG_GETARG_JSONB_P(1);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	JsonbValue	root;
	SchemaProblem p;
	Violations	v;
	ListCell   *lp,
			   *lm;

	initStringInfo(&p.path);
	p.message = NULL;
	root_value(schema, &root);
	if (!check_schema(&root, &p))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid schema at $%s: %s", p.path.data, p.message),
				 errhint("The keywords are type, required, properties, items, enum, minimum, maximum, minLength, maxLength, pattern and additionalProperties.")));

	InitMaterializedSRF(fcinfo, 0);
	validate_jsonb(value, schema, MAX_VIOLATIONS, &v);
	forboth(lp, v.paths, lm, v.messages)
	{
		Datum		values[2] = {CStringGetTextDatum(lfirst(lp)), CStringGetTextDatum(lfirst(lm))};
		bool		nulls[2] = {false, false};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
