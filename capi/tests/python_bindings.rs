//! The Python package's ctypes declarations match the committed header: every function it
//! binds exists with the same parameter and return types, and every `ctypes.Structure` has
//! the fields of its C struct in the same order with the same types. The module is read
//! with Python's `ast` (nothing is imported, so torch is not needed); skipped, saying why,
//! where there is no `python3`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Reads the ctypes declarations of `python/thor_kernels/_lib.py` (`_SIGNATURES` and the
/// structures) and prints one line per
/// item: `fn NAME RET ARG...` and `struct NAME FIELD:TYPE...`, types spelled as in C
/// (`int32_t`, `float*`, `void*`, `struct:OptimizerConfig*`).
const READER: &str = r#"
import ast, sys
src = open(sys.argv[1]).read()
tree = ast.parse(src)
class T(str):
    def __mul__(self, n):  # a ctypes array type, `c_int64 * 2`
        return T(f"{self}[{n}]")
C = {k: T(v) for k, v in {"c_int32": "int32_t", "c_uint32": "uint32_t", "c_int64": "int64_t",
     "c_uint64": "uint64_t", "c_float": "float", "c_double": "double", "c_void_p": "void*",
     "c_char_p": "char*", "c_uint8": "uint8_t"}.items()}
ns = dict(C)
ns["POINTER"] = lambda t: t + "*"
ns["None"] = None
structs = {}
fnptrs = {}
for stmt in tree.body:
    # `ThorXFn = CFUNCTYPE(ret, args...)`: a callback type, named as the header's typedef.
    if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
            and ast.unparse(stmt.value.func) == "CFUNCTYPE"):
        name = stmt.targets[0].id
        ts = [eval(compile(ast.Expression(a), "fnptr", "eval"), dict(ns)) for a in stmt.value.args]
        fnptrs[name] = ts
        ns[name] = T(name)
for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Structure") for b in node.bases):
        ns[node.name] = "struct:" + node.name
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and stmt.targets[0].id == "_fields_":
                structs[node.name] = eval(compile(ast.Expression(stmt.value), "fields", "eval"), dict(ns))
sigs = None
for stmt in tree.body:
    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == "_SIGNATURES":
        sigs = eval(compile(ast.Expression(stmt.value), "sigs", "eval"), dict(ns))
for name, (args, ret) in sigs.items():
    print("fn", name, ret if ret is not None else "void", *args)
for name, fields in structs.items():
    print("struct", name, *[f"{n}:{t}" for n, t in fields])
for name, (ret, *args) in fnptrs.items():
    print("fnptr", name, ret, *args)
"#;

/// A C type from the header, normalised: no `const`, `struct ` or `enum `, no spaces; the
/// status enum as the `int32_t` it is passed as.
fn norm(c: &str) -> String {
    let t = c
        .replace("const", " ")
        .replace("struct ", "")
        .replace("enum ", "")
        .split_whitespace()
        .collect::<String>();
    if t == "ThorStatus" {
        "int32_t".into()
    } else {
        t
    }
}

/// `name -> (return type, parameter types)` of every function in the header.
fn header_functions(h: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let code = code_of(h);
    let mut out = BTreeMap::new();
    for decl in code.split(';') {
        let Some(open) = decl.find("thor_v1_") else {
            continue;
        };
        let Some(paren) = decl[open..].find('(') else {
            continue;
        };
        let name = decl[open..open + paren].trim().to_string();
        let ret = norm(decl[..open].rsplit(['{', '}']).next().unwrap_or(""));
        let args = param_types(&decl[open + paren + 1..decl.rfind(')').unwrap()]);
        out.insert(name, (ret, args));
    }
    out
}

/// The header's code on one line: comment and preprocessor lines dropped.
fn code_of(h: &str) -> String {
    h.lines()
        .filter(|l| !l.trim_start().starts_with("//") && !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The types of a C parameter list (names dropped).
fn param_types(params: &str) -> Vec<String> {
    let params = params.trim();
    if params == "void" || params.is_empty() {
        return Vec::new();
    }
    params
        .split(',')
        .map(|p| {
            // Drop the parameter name: the last identifier.
            let p = p.trim();
            let cut = p
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            norm(&p[..cut])
        })
        .collect()
}

/// `name -> (return type, parameter types)` of every function-pointer typedef
/// (`typedef int32_t (*ThorXFn)(void *user, ...);`) in the header.
fn header_fn_types(h: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let code = code_of(h);
    let mut out = BTreeMap::new();
    for decl in code.split(';') {
        let Some(t) = decl.find("typedef ") else {
            continue;
        };
        let decl = &decl[t + "typedef ".len()..];
        let Some(star) = decl.find("(*") else {
            continue;
        };
        let close = star + decl[star..].find(')').unwrap();
        let name = decl[star + 2..close].trim().to_string();
        let open = close + decl[close..].find('(').unwrap();
        let args = param_types(&decl[open + 1..decl.rfind(')').unwrap()]);
        out.insert(name, (norm(&decl[..star]), args));
    }
    out
}

/// `name -> [(field, type)]` of every struct with a body in the header.
fn header_structs(h: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out = BTreeMap::new();
    let mut rest = h;
    while let Some(i) = rest.find("typedef struct ") {
        rest = &rest[i + "typedef struct ".len()..];
        let Some(brace) = rest.find('{') else { break };
        let name = rest[..brace].trim();
        if name.contains(' ') || name.contains(';') {
            continue;
        }
        let body_end = rest.find('}').unwrap();
        let fields = rest[brace + 1..body_end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .map(|l| {
                let l = l.trim_end_matches(';');
                let (t, n) = l.rsplit_once(' ').unwrap();
                // A pointer field `const float *acts` is `acts: float*`.
                let name = n.trim_start_matches('*');
                let t = norm(t) + &"*".repeat(n.len() - name.len());
                // An array field `int64_t stride[2]` is `stride: int64_t[2]`.
                match name.split_once('[') {
                    Some((n, len)) => (n.to_string(), format!("{t}[{len}")),
                    None => (name.to_string(), t),
                }
            })
            .collect();
        out.insert(name.to_string(), fields);
    }
    out
}

/// Whether a ctypes type (as the reader spells it) passes the C parameter type `c`.
fn compatible(py: &str, c: &str) -> bool {
    if py == c {
        return true;
    }
    let c_ptrs = c.matches('*').count();
    match py {
        // c_void_p carries any single pointer.
        "void*" => c_ptrs == 1,
        "void**" => c_ptrs == 2,
        "char*" => c == "char*",
        _ => match py.strip_prefix("struct:") {
            // POINTER(OptimizerConfig) is a `ThorOptimizerConfig *`.
            Some(s) => c == format!("Thor{}", s.trim_end_matches('*')) + "*",
            None => false,
        },
    }
}

#[test]
fn python_ctypes_declarations_match_the_header() {
    let module = repo().join("python/thor_kernels/_lib.py");
    let out = match Command::new("python3")
        .arg("-c")
        .arg(READER)
        .arg(&module)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED python_ctypes_declarations_match_the_header: no python3 ({e})");
            return;
        }
    };
    assert!(
        out.status.success(),
        "reading the module failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = std::fs::read_to_string(repo().join("include/thor_kernels.h")).unwrap();
    let fns = header_functions(&header);
    let structs = header_structs(&header);
    let fn_types = header_fn_types(&header);
    assert!(
        fn_types.len() >= 3,
        "parsed {} callback types",
        fn_types.len()
    );
    assert!(fns.len() >= 30, "parsed {} header functions", fns.len());
    let listing = String::from_utf8(out.stdout).unwrap();
    let (mut n_fn, mut n_struct) = (0, 0);
    let mut errors = Vec::new();
    for line in listing.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("fn") => {
                n_fn += 1;
                let name = w.next().unwrap();
                let ret = w.next().unwrap();
                let args: Vec<&str> = w.collect();
                let Some((c_ret, c_args)) = fns.get(name) else {
                    errors.push(format!("{name}: bound in Python, not in the header"));
                    continue;
                };
                let ret_ok = ret == c_ret || (ret == "char*" && c_ret == "char*");
                if !ret_ok {
                    errors.push(format!("{name}: returns {ret} in Python, {c_ret} in C"));
                }
                if args.len() != c_args.len() {
                    errors.push(format!(
                        "{name}: {} parameters in Python, {} in C",
                        args.len(),
                        c_args.len()
                    ));
                    continue;
                }
                for (i, (p, c)) in args.iter().zip(c_args).enumerate() {
                    if !compatible(p, c) {
                        errors.push(format!("{name}: parameter {i} is {p} in Python, {c} in C"));
                    }
                }
            }
            Some("struct") => {
                n_struct += 1;
                let name = w.next().unwrap();
                let c_name = format!("Thor{name}");
                let Some(c_fields) = structs.get(&c_name) else {
                    errors.push(format!("{name}: no struct {c_name} in the header"));
                    continue;
                };
                let py: Vec<(String, String)> = w
                    .map(|f| {
                        let (n, t) = f.split_once(':').unwrap();
                        (n.to_string(), t.to_string())
                    })
                    .collect();
                let same = py.len() == c_fields.len()
                    && py
                        .iter()
                        .zip(c_fields)
                        .all(|((pn, pt), (cn, ct))| pn == cn && compatible(pt, ct));
                if !same {
                    errors.push(format!(
                        "{name}: fields {py:?} in Python, {c_fields:?} in C"
                    ));
                }
            }
            Some("fnptr") => {
                let name = w.next().unwrap();
                let ret = w.next().unwrap();
                let args: Vec<&str> = w.collect();
                match fn_types.get(name) {
                    None => errors.push(format!("{name}: no callback typedef in the header")),
                    Some((c_ret, c_args)) => {
                        let ok = ret == c_ret
                            && args.len() == c_args.len()
                            && args.iter().zip(c_args).all(|(p, c)| compatible(p, c));
                        if !ok {
                            errors.push(format!(
                                "{name}: {ret} ({args:?}) in Python, {c_ret} ({c_args:?}) in C"
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        n_fn >= 20 && n_struct >= 3,
        "read {n_fn} functions, {n_struct} structs"
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The checker bites: a changed parameter type, a missing parameter and a reordered struct
/// are each reported.
#[test]
fn the_comparison_notices_drift() {
    let header = "typedef struct ThorX {\n  int32_t a;\n  float b;\n} ThorX;\n\
                  enum ThorStatus thor_v1_f(struct ThorContext *ctx, int64_t n, const float *x);\n";
    let fns = header_functions(header);
    let (ret, args) = &fns["thor_v1_f"];
    assert_eq!(ret, "int32_t");
    assert_eq!(args, &["ThorContext*", "int64_t", "float*"]);
    assert!(compatible("void*", &args[0]));
    assert!(!compatible("int32_t", &args[1]));
    assert!(!compatible("void**", &args[2]));
    assert!(compatible("struct:X*", "ThorX*"));
    assert!(!compatible("struct:Y*", "ThorX*"));
    let t = header_fn_types("typedef int32_t (*ThorF)(void *user, const double *x, int64_t n);");
    assert_eq!(
        t["ThorF"],
        (
            "int32_t".to_string(),
            vec!["void*".to_string(), "double*".into(), "int64_t".into()]
        )
    );
    let s = header_structs(header);
    assert_eq!(
        s["ThorX"],
        [
            ("a".to_string(), "int32_t".to_string()),
            ("b".into(), "float".into())
        ]
    );
}
