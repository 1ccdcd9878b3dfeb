"""The trusted Lua files (sandbox_worker/lua/): one load order, no globals read after the
prelude, shared tables never replaced, nothing left behind in the real globals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lupa.lua54
import lupa.luajit21
import pytest

import sandbox_worker
from orchestrator._proto import sandbox_pb2
from sandbox_worker.runtime import LuaSchedulerRuntime, _lua_sources

LUA_DIR = Path(sandbox_worker.__file__).resolve().parent / "lua"
FILES = sorted(str(p.relative_to(LUA_DIR)) for p in LUA_DIR.rglob("*.lua"))
LOADER = (LUA_DIR / "loader.lua").read_text()
README = (LUA_DIR / "README.md").read_text()

# Tables that several files hold: created once, never replaced (README.md, "Shared state").
SHARED_TABLES = [
    "jobs", "pools", "pool_ids", "worker_pool", "models", "model_list", "aliases",
    "base_refs", "tenants", "tenant_ids", "metrics", "config", "master_of", "limits", "B",
]  # fmt: skip

LANGUAGES = {"luajit": sandbox_pb2.LANGUAGE_LUAJIT, "lua54": sandbox_pb2.LANGUAGE_LUA54}


def load_order() -> list[str]:
    """The files loader.lua runs, in its order."""
    order = ["loader.lua"]
    for match in re.finditer(r'chunk\("([\w/.]+\.lua)"|builtins\("([\w.]+\.lua)"', LOADER):
        order.append(match.group(1) or "builtins/" + match.group(2))
    return order


def test_every_file_is_loaded_once_in_the_documented_order() -> None:
    """loader.lua names every file once; README.md lists them in the same order."""
    order = load_order()
    assert sorted(order) == FILES
    assert len(set(order)) == len(order)
    documented = re.findall(r"^\d+\. `([\w/.]+)`", README, flags=re.MULTILINE)
    assert documented == order


def test_sources_are_every_lua_file() -> None:
    """runtime.py hands the loader every .lua file under lua/, by its relative path."""
    assert sorted(_lua_sources()) == FILES


@pytest.mark.parametrize("module", [lupa.luajit21, lupa.lua54])
def test_loader_refuses_a_file_it_does_not_name(module: Any) -> None:
    """A file outside the load order is an error, not silently skipped."""
    lua = module.LuaRuntime(register_eval=False, register_builtins=False)
    sources = {**_lua_sources(), "extra.lua": "return 1"}
    compile_loader = lua.eval("function(src, name) return assert(load(src, name, 't')) end")
    loader = compile_loader(sources["loader.lua"], "=sandbox/loader.lua")
    with pytest.raises(module.LuaError, match=r"extra\.lua is not in the load order"):
        loader(lua.table_from(sources))


def test_no_trusted_file_but_the_prelude_and_loader_reads_a_global() -> None:
    """The LuaJIT bytecode of every other file holds no global access (GGET/GSET).

    The loader also runs those files with an environment that raises on any global
    access; this catches the paths no test happens to run.
    """
    lua = lupa.luajit21.LuaRuntime()
    scan = lua.eval(
        """function(source, name)
          local util = require("jit.util")
          local band = bit.band
          local function op_at(fn, pc) return band(util.funcbc(fn, pc), 0xff) end
          local GGET = op_at(load("return some_global"), 1)
          local GSET = op_at(load("some_global = 1"), 2)
          local found = {}
          local function walk(fn)
            local pc = 1
            while true do
              local ins = util.funcbc(fn, pc)
              if not ins then break end
              local op = band(ins, 0xff)
              if op == GGET or op == GSET then
                found[#found + 1] = name .. ":" .. util.funcinfo(fn, pc).currentline
              end
              pc = pc + 1
            end
            for i = -1, -1000000, -1 do
              local k = util.funck(fn, i)
              if k == nil then break end
              if type(k) == "proto" then walk(k) end
            end
          end
          walk(assert(load(source, "=" .. name)))
          return table.concat(found, " ")
        end"""
    )
    assert scan("x = 1\nreturn function(...) return y, ... end", "p.lua") == "p.lua:1 p.lua:2"
    for file in FILES:
        if file in ("prelude.lua", "loader.lua"):
            continue
        assert scan((LUA_DIR / file).read_text(), file) == "", file


def as_const(source: str) -> str:
    """The source with every local declaration of a shared table made <const> (Lua 5.4)."""

    def declare(match: re.Match[str]) -> str:
        names = [
            f"{n.strip()} <const>" if n.strip() in SHARED_TABLES else n.strip()
            for n in match.group(2).split(",")
        ]
        return match.group(1) + ", ".join(names) + match.group(3)

    def parameters(match: re.Match[str]) -> str:
        params = [p.strip() for p in match.group(1).split(",")]
        shared = [p for p in params if p in SHARED_TABLES]
        renamed = ", ".join(f"param_{p}" if p in shared else p for p in params)
        consts = "".join(f" local {p} <const> = param_{p}" for p in shared)
        return f"return function({renamed}){consts}"

    source = re.sub(r"^return function\(([\w\s,]*)\)", parameters, source, flags=re.MULTILINE)
    return re.sub(r"^(\s*local )([\w\s,]+?)(\s*=[^=])", declare, source, flags=re.MULTILINE)


@pytest.mark.parametrize("file", FILES)
def test_shared_tables_are_never_replaced(file: str) -> None:
    """Other files hold these tables: a file that assigned one anew would leave them stale.

    Every local or parameter that holds one is made <const> and the file compiled by
    Lua 5.4, which refuses any later assignment.
    """
    lua = lupa.lua54.LuaRuntime()
    compile_ = lua.eval("function(src, name) local f, err = load(src, name, 't') return err end")
    probe = "local jobs = {}\nlocal f = function() jobs = {} end"
    assert "assign to const variable 'jobs'" in compile_(as_const(probe), "=probe")
    probe = "return function(P, B)\n  B = {}\nend"
    assert "assign to const variable 'B'" in compile_(as_const(probe), "=probe")
    source = (LUA_DIR / file).read_text()
    assert compile_(as_const(source), "=" + file) is None


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_loading_leaves_the_real_globals_alone(language: str) -> None:
    """No global and no package.loaded entry names a trusted file or module."""
    runtime = LuaSchedulerRuntime(LANGUAGES[language])
    module = lupa.luajit21 if language == "luajit" else lupa.lua54
    fresh = module.LuaRuntime(register_eval=False, register_builtins=False)
    keys = "function() local out = {} for k in pairs(_G) do out[#out + 1] = k end return out end"
    loaded = (
        "function() local out = {} for k in pairs(package.loaded) do out[#out + 1] = k end"
        " return out end"
    )
    assert set(runtime.lua.eval(keys)().values()) <= set(fresh.eval(keys)().values()) - {"python"}
    new_modules = set(runtime.lua.eval(loaded)().values()) - set(fresh.eval(loaded)().values())
    # The prelude's LuaJIT helpers, and the FFI its clock for instrument.lua reads through.
    assert new_modules <= {"table.new", "table.clear", "ffi"}
