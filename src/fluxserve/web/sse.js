// Server-sent events read from a fetch() body. EventSource cannot send an
// Authorization header, so the page reads the stream itself; this parses it by
// the HTML standard's rules: lines end with CRLF, LF or CR, a blank line ends
// an event, `event:`, `data:` (joined with newlines) and `id:` fields, lines
// starting with a colon are comments (heartbeats).

export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.lastEventId = "";
    this.type = "";
    this.data = [];
  }

  // Takes decoded text in pieces of any size.
  feed(text) {
    let pending = this.buffer + text;
    // A CR at the very end may be the first half of a CRLF: wait for the next piece.
    let heldCr = "";
    if (pending.endsWith("\r")) {
      heldCr = "\r";
      pending = pending.slice(0, -1);
    }
    const lines = pending.split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + heldCr;
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }

  dispatch() {
    if (this.data.length > 0) {
      this.onEvent({
        event: this.type || "message",
        data: this.data.join("\n"),
        id: this.lastEventId,
      });
    }
    this.type = "";
    this.data = [];
  }
}

// Yields each event of a response body; an event left unfinished when the
// body ends is dropped, as the standard says.
export async function* readEventStream(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const events = [];
  const parser = new SseParser((event) => events.push(event));
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(decoder.decode(value, { stream: true }));
      yield* events.splice(0);
    }
  } finally {
    // Closes the connection when the reader stops early, after the last event.
    reader.cancel().catch(() => {});
  }
}
