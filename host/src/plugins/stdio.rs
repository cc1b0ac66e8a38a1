//! What a strategy may print, and the environment it sees. A Rust guest that panics reads its
//! environment (for `RUST_BACKTRACE`) and writes the panic's message to stderr before it traps:
//! with those imports trapping, the message was lost and the fault said only "unknown import".
//! Here the environment is empty, and stdout and stderr go to a small buffer per call, which
//! the fault report quotes. Nothing else of WASI's I/O is given: files, sockets and stdin
//! still trap.
//!
//! Every resource is the host type `()`, as the imports left to trap are: an output stream
//! carries no state (all of them write to the one buffer), and a type shared with the trapping
//! definitions keeps the component's own type equalities (stderr's stream is the streams
//! interface's) satisfied whichever of them it imports.

use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Linker, Lower, Resource, ResourceType};

use super::guest::GuestState;

/// How much a guest's output one call keeps: enough for a panic's message and location.
pub const PRINTED_LIMIT: usize = 2048;

/// How much a guest may write at once, as `check-write` tells it.
const WRITE_BUDGET: u64 = 4096;

/// `wasi:io/streams.stream-error`. Never returned: writes always succeed, the buffer dropping
/// what is over its bound.
#[derive(ComponentType, Lower)]
#[component(variant)]
#[allow(dead_code)]
enum StreamError {
    #[component(name = "last-operation-failed")]
    LastOperationFailed(Resource<()>),
    #[component(name = "closed")]
    Closed,
}

type Written = wasmtime::Result<(Result<(), StreamError>,)>;

/// Defines the WASI interface `import` names if it is one of the printing and environment
/// interfaces; the caller links the rest to traps.
pub fn define(linker: &mut Linker<GuestState>, import: &str) -> wasmtime::Result<()> {
    let Some(interface) = import.split('@').next() else {
        return Ok(());
    };
    let host = ResourceType::host::<()>();
    match interface {
        "wasi:cli/environment" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("get-environment", |_, (): ()| {
                Ok((Vec::<(String, String)>::new(),))
            })?;
            i.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
            i.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
        }
        "wasi:cli/stdout" | "wasi:cli/stderr" => {
            let getter = if interface.ends_with("stdout") {
                "get-stdout"
            } else {
                "get-stderr"
            };
            let mut i = linker.instance(import)?;
            i.resource("output-stream", host, |_, _| Ok(()))?;
            i.func_wrap(getter, |_, (): ()| Ok((Resource::<()>::new_own(0),)))?;
        }
        "wasi:cli/terminal-stdout" | "wasi:cli/terminal-stderr" => {
            let getter = if interface.ends_with("stdout") {
                "get-terminal-stdout"
            } else {
                "get-terminal-stderr"
            };
            // Not a terminal.
            let mut i = linker.instance(import)?;
            i.func_wrap(getter, |_, (): ()| Ok((None::<Resource<()>>,)))?;
        }
        "wasi:io/streams" => {
            let mut i = linker.instance(import)?;
            i.resource("output-stream", host, |_, _| Ok(()))?;
            i.func_wrap(
                "[method]output-stream.check-write",
                |_, (_,): (Resource<()>,)| Ok((Ok::<u64, StreamError>(WRITE_BUDGET),)),
            )?;
            i.func_wrap(
                "[method]output-stream.write",
                |cx: StoreContextMut<'_, GuestState>, (_, bytes): (Resource<()>, Vec<u8>)| {
                    write(cx, &bytes)
                },
            )?;
            i.func_wrap(
                "[method]output-stream.blocking-write-and-flush",
                |cx: StoreContextMut<'_, GuestState>, (_, bytes): (Resource<()>, Vec<u8>)| {
                    write(cx, &bytes)
                },
            )?;
            for flush in [
                "[method]output-stream.flush",
                "[method]output-stream.blocking-flush",
            ] {
                i.func_wrap(flush, |_, (_,): (Resource<()>,)| -> Written {
                    Ok((Ok(()),))
                })?;
            }
            i.func_wrap(
                "[method]output-stream.subscribe",
                |_, (_,): (Resource<()>,)| Ok((Resource::<()>::new_own(0),)),
            )?;
        }
        "wasi:io/poll" => {
            // The only thing to wait for is room to write, which is always there.
            let mut i = linker.instance(import)?;
            i.resource("pollable", host, |_, _| Ok(()))?;
            i.func_wrap("[method]pollable.ready", |_, (_,): (Resource<()>,)| {
                Ok((true,))
            })?;
            i.func_wrap("[method]pollable.block", |_, (_,): (Resource<()>,)| Ok(()))?;
            i.func_wrap("poll", |_, (waited,): (Vec<Resource<()>>,)| {
                Ok(((0..waited.len() as u32).collect::<Vec<u32>>(),))
            })?;
        }
        _ => {}
    }
    Ok(())
}

fn write(mut cx: StoreContextMut<'_, GuestState>, bytes: &[u8]) -> Written {
    if bytes.len() as u64 > WRITE_BUDGET {
        // As WASI says: more than `check-write` allowed is the guest's error.
        wasmtime::bail!(
            "wrote {} bytes at once; at most {WRITE_BUDGET}",
            bytes.len()
        );
    }
    cx.data_mut().print(bytes);
    Ok((Ok(()),))
}
