// Command render_ollama renders a Modelfile's TEMPLATE the way ollama's chat path does, with
// Go's own text/template, so tests can check our Modelfiles without ollama.
//
// It reads one JSON request on stdin:
//
//	{"modelfile": "...", "chat_template": "the GGUF's tokenizer.chat_template",
//	 "model_family": "qwen3", "messages": [...], "tools": [...], "think": true|false|null,
//	 "think_default": true}
//
// messages and tools are the JSON of ollama's /api/chat request. think_default: ollama >=
// 0.12.4 sends think: true when a request to a thinking-capable model gives none; false
// models 0.9.0 to 0.12.3, which leave it unset.
//
// It writes one JSON object: the capabilities ollama infers from the Go template and from the
// GGUF's chat template, which of the two ollama >= 0.30 selects, the tool-call tag and think
// tags it reads from the template, and the prompt (or the error a request gets).
//
// What is ollama's here is facts read from its source (server/images.go, server/routes.go,
// server/prompt.go, template/template.go, thinking/template.go, tools/template.go), written
// again for this test: the data the template is executed with, the merging of consecutive
// messages, the Modelfile's SYSTEM as a first message, the Qwen3 history filter, and the
// checks that decide between the Modelfile TEMPLATE and the GGUF's chat template. The
// template gets none of ollama's template functions: ours use none, and a template that
// starts using one fails here until the function is added.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"unicode"
)

// ---------------------------------------------------------------- the request

type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int            `json:"index"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type request struct {
	Modelfile    string          `json:"modelfile"`
	ChatTemplate string          `json:"chat_template"`
	ModelFamily  string          `json:"model_family"`
	Messages     []message       `json:"messages"`
	Tools        json.RawMessage `json:"tools"`
	Think        *bool           `json:"think"`
	ThinkDefault bool            `json:"think_default"`
}

// ---------------------------------------------------------------- what the template sees
// (ollama's templateMessage, templateToolCall and templateTool: their JSON is what a template
// prints for a tool or a call's arguments)

type templateArgs map[string]any

func (a templateArgs) String() string {
	if a == nil {
		return "{}"
	}
	return marshal(map[string]any(a))
}

type templateToolCall struct {
	ID       string
	Function struct {
		Index     int
		Name      string
		Arguments templateArgs
	}
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

type templateTool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string         `json:"type"`
			Defs       any            `json:"$defs,omitempty"`
			Items      any            `json:"items,omitempty"`
			Required   []string       `json:"required,omitempty"`
			Properties map[string]any `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

func (t templateTool) String() string { return marshal(t) }

type templateTools []templateTool

func (t templateTools) String() string { return marshal([]templateTool(t)) }

func marshal(v any) string {
	b, _ := json.Marshal(v) // as ollama: Go's compact JSON, keys of maps sorted, <>& escaped
	return string(b)
}

// ---------------------------------------------------------------- the Modelfile

type modelfile struct {
	Template   string
	System     string
	Parameters map[string][]string
}

// parseModelfile reads the commands our Modelfiles use: a command, a space, and a value that
// is bare, "quoted" or """quoted across lines""".
func parseModelfile(text string) (modelfile, error) {
	m := modelfile{Parameters: map[string][]string{}}
	rest := text
	for rest != "" {
		line := rest
		if i := strings.IndexByte(rest, '\n'); i >= 0 {
			line, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, _ := strings.Cut(line, " ")
		value = strings.TrimLeft(value, " \t")
		if strings.HasPrefix(value, `"""`) {
			all := value[3:] + "\n" + rest
			end := strings.Index(all, `"""`)
			if end < 0 {
				return m, errors.New("unterminated \"\"\" in the Modelfile")
			}
			value, rest = all[:end], strings.TrimPrefix(all[end+3:], "\n")
		} else if len(value) >= 2 && strings.HasPrefix(value, `"`) && strings.HasSuffix(value, `"`) {
			value = value[1 : len(value)-1]
		}
		switch strings.ToLower(name) {
		case "template":
			m.Template = value
		case "system":
			m.System = value
		case "parameter":
			key, v, _ := strings.Cut(value, " ")
			v = strings.TrimSpace(v)
			if len(v) >= 2 && strings.HasPrefix(v, `"`) && strings.HasSuffix(v, `"`) {
				v = v[1 : len(v)-1]
			}
			m.Parameters[key] = append(m.Parameters[key], v)
		}
	}
	return m, nil
}

// ---------------------------------------------------------------- capabilities and selection

// identifiers: every field and variable name in the template's trees, lower-cased (ollama's
// Template.Vars).
func identifiers(t *template.Template) map[string]bool {
	names := map[string]bool{}
	var walk func(n parse.Node)
	walk = func(n parse.Node) {
		switch n := n.(type) {
		case *parse.ListNode:
			if n != nil {
				for _, c := range n.Nodes {
					walk(c)
				}
			}
		case *parse.ActionNode:
			walk(n.Pipe)
		case *parse.TemplateNode:
			walk(n.Pipe)
		case *parse.IfNode:
			walkBranch(&n.BranchNode, walk)
		case *parse.RangeNode:
			walkBranch(&n.BranchNode, walk)
		case *parse.WithNode:
			walkBranch(&n.BranchNode, walk)
		case *parse.PipeNode:
			if n != nil {
				for _, c := range n.Cmds {
					for _, a := range c.Args {
						walk(a)
					}
				}
			}
		case *parse.FieldNode:
			for _, s := range n.Ident {
				names[strings.ToLower(s)] = true
			}
		case *parse.VariableNode:
			for _, s := range n.Ident {
				names[strings.ToLower(s)] = true
			}
		}
	}
	for _, tt := range t.Templates() {
		if tt.Tree != nil {
			walk(tt.Root)
		}
	}
	return names
}

func walkBranch(b *parse.BranchNode, walk func(parse.Node)) {
	walk(b.Pipe)
	walk(b.List)
	if b.ElseList != nil {
		walk(b.ElseList)
	}
}

// thinkTags: ollama's thinking.InferTags. For each {{ .Thinking }} inside a range over
// .Messages, the first and last text of the nearest enclosing list, trimmed; later finds win.
func thinkTags(t *template.Template) (string, string) {
	opening, closing := "", ""
	var ancestors []parse.Node
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		if l, ok := n.(*parse.ListNode); ok && l == nil {
			return
		}
		ancestors = append(ancestors, n)
		defer func() { ancestors = ancestors[:len(ancestors)-1] }()
		if f, ok := n.(*parse.FieldNode); ok && len(f.Ident) > 0 && f.Ident[0] == "Thinking" {
			var loop *parse.RangeNode
			for i := len(ancestors) - 1; i >= 0 && loop == nil; i-- {
				loop, _ = ancestors[i].(*parse.RangeNode)
			}
			if loop != nil && pipeNames(loop.Pipe)["Messages"] {
				for i := len(ancestors) - 1; i >= 0; i-- {
					if l, ok := ancestors[i].(*parse.ListNode); ok {
						if text, ok := l.Nodes[0].(*parse.TextNode); ok {
							opening = strings.TrimSpace(text.String())
						}
						if text, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
							closing = strings.TrimSpace(text.String())
						}
						break
					}
				}
			}
		}
		switch x := n.(type) {
		case *parse.ListNode:
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.BranchNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
			if x.List != nil {
				visit(x.List)
			}
			if x.ElseList != nil {
				visit(x.ElseList)
			}
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.IfNode:
			visit(&x.BranchNode)
		case *parse.RangeNode:
			visit(&x.BranchNode)
		case *parse.WithNode:
			visit(&x.BranchNode)
		case *parse.TemplateNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				visit(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				visit(a)
			}
		}
	}
	visit(t.Root)
	return opening, closing
}

// pipeNames: the first identifier of every field in a pipeline.
func pipeNames(p *parse.PipeNode) map[string]bool {
	names := map[string]bool{}
	if p == nil {
		return names
	}
	for _, c := range p.Cmds {
		for _, a := range c.Args {
			switch a := a.(type) {
			case *parse.FieldNode:
				names[a.Ident[0]] = true
			case *parse.PipeNode:
				for k := range pipeNames(a) {
					names[k] = true
				}
			}
		}
	}
	return names
}

// toolCallTag: ollama's tools.parseTag, the text that starts a tool call in the model's
// output: the first text inside the first {{ if }} on .ToolCalls, up to a "{".
func toolCallTag(t *template.Template) string {
	node := findToolCallsIf(t.Root.Nodes)
	if node == nil {
		return "{"
	}
	text := firstText(node.List.Nodes)
	if text == nil {
		return "{"
	}
	tag, _, _ := strings.Cut(string(text.Text), "{")
	if tag = strings.TrimSpace(tag); tag == "" {
		return "{"
	}
	return tag
}

func findToolCallsIf(nodes []parse.Node) *parse.IfNode {
	lists := func(l, e *parse.ListNode) *parse.IfNode {
		if found := findToolCallsIf(l.Nodes); found != nil {
			return found
		}
		if e != nil {
			return findToolCallsIf(e.Nodes)
		}
		return nil
	}
	for _, node := range nodes {
		var found *parse.IfNode
		switch n := node.(type) {
		case *parse.IfNode:
			for _, c := range n.Pipe.Cmds {
				for _, a := range c.Args {
					if f, ok := a.(*parse.FieldNode); ok && contains(f.Ident, "ToolCalls") {
						return n
					}
				}
			}
			found = lists(n.List, n.ElseList)
		case *parse.ListNode:
			found = findToolCallsIf(n.Nodes)
		case *parse.RangeNode:
			found = lists(n.List, n.ElseList)
		case *parse.WithNode:
			found = lists(n.List, n.ElseList)
		}
		if found != nil {
			return found
		}
	}
	return nil
}

// firstText: depth first, the first text that is not only spaces, stopping at the first
// action or at a branch that holds none.
func firstText(nodes []parse.Node) *parse.TextNode {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) > 0 {
				return n
			}
		case *parse.ListNode:
			if text := firstText(n.Nodes); text != nil {
				return text
			}
		case *parse.IfNode:
			return branchText(&n.BranchNode)
		case *parse.RangeNode:
			return branchText(&n.BranchNode)
		case *parse.WithNode:
			return branchText(&n.BranchNode)
		case *parse.ActionNode:
			return nil
		}
	}
	return nil
}

func branchText(b *parse.BranchNode) *parse.TextNode {
	if text := firstText(b.List.Nodes); text != nil {
		return text
	}
	if b.ElseList != nil {
		return firstText(b.ElseList.Nodes)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func goTemplateCapabilities(t *template.Template) []string {
	names := identifiers(t)
	var caps []string
	if names["tools"] {
		caps = append(caps, "tools")
	}
	if names["suffix"] {
		caps = append(caps, "insert")
	}
	if o, c := thinkTags(t); o != "" && c != "" {
		caps = append(caps, "thinking")
	}
	return caps
}

func goTemplateHasToolRoundTrip(t *template.Template) bool {
	names := identifiers(t)
	if !names["tools"] || !names["toolcalls"] {
		return false
	}
	raw := templateSource
	return strings.Contains(raw, `eq .Role "tool"`) || strings.Contains(raw, "tool_response") ||
		strings.Contains(raw, "TOOL_RESULTS")
}

func chatTemplateCapabilities(chat string) []string {
	var caps []string
	if chat == "" {
		return caps
	}
	if chatTemplateHasTools(chat) {
		caps = append(caps, "tools")
	}
	has := strings.Contains
	splitsThink := has(chat, "content.split('</think>')") || has(chat, `content.split("</think>")`)
	if (has(chat, "<think>") && has(chat, "</think>")) ||
		(splitsThink && !has(chat, "reasoning_content") && !has(chat, "<SPECIAL_12>")) {
		caps = append(caps, "thinking")
	}
	return caps
}

func chatTemplateHasTools(chat string) bool {
	return strings.Contains(chat, "tools") || strings.Contains(chat, "tool_call")
}

func chatTemplateHasToolRoundTrip(chat string) bool {
	if !chatTemplateHasTools(chat) {
		return false
	}
	has := func(s string) bool { return strings.Contains(chat, s) }
	calls := has("tool_calls") || has("assistant_tool_call")
	return calls && (has("tool_response") || has("tool_results") || has("role'] == 'tool'") ||
		has(`role'] == "tool"`) || has(`role"] == 'tool'`) || has(`role"] == "tool"`) ||
		has(`message.role == 'tool'`) || has(`message.role == "tool"`) || has("ipython"))
}

func sameCapabilities(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, c := range a {
		if !contains(b, c) {
			return false
		}
	}
	return true
}

// preferChatTemplate: ollama >= 0.30 renders with the GGUF's chat template (llama-server's
// Jinja) instead of the Modelfile TEMPLATE when this holds (and OLLAMA_GO_TEMPLATE is unset).
func preferChatTemplate(chat string, chatCaps []string, t *template.Template, goCaps []string) bool {
	if len(chatCaps) > len(goCaps) {
		return !goTemplateHasToolRoundTrip(t) || chatTemplateHasToolRoundTrip(chat)
	}
	if !sameCapabilities(chatCaps, goCaps) || !contains(chatCaps, "tools") || !contains(goCaps, "tools") {
		return false
	}
	return chatTemplateHasToolRoundTrip(chat) && !goTemplateHasToolRoundTrip(t)
}

// ---------------------------------------------------------------- the chat path

// collate: consecutive messages of one role (but tool results) become one, joined by a blank
// line; .System is every system message, joined the same way.
func collate(msgs []message) (string, []message) {
	var system []string
	var out []message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

// thinkingParser: ollama's thinking.Parser on a whole text: the reasoning of an opening tag
// at the start (after spaces) up to the closing tag, and the rest with its leading spaces cut.
func splitThinking(text, opening, closing string) (string, string) {
	trimmed := strings.TrimLeftFunc(text, unicode.IsSpace)
	if !strings.HasPrefix(trimmed, opening) {
		return "", text
	}
	after := strings.TrimLeftFunc(trimmed[len(opening):], unicode.IsSpace)
	thinking, rest, found := strings.Cut(after, closing)
	if !found {
		return after, ""
	}
	return thinking, strings.TrimLeftFunc(rest, unicode.IsSpace)
}

// filterThinkTags: for Qwen3 models, the think block of assistant turns before the last user
// turn is dropped from their content.
func filterThinkTags(msgs []message, family string) []message {
	if family != "qwen3" {
		return msgs
	}
	lastUser := -1
	for i, m := range msgs {
		if m.Role == "user" {
			lastUser = i
		}
	}
	for i := range msgs {
		if msgs[i].Role == "assistant" && i < lastUser {
			_, msgs[i].Content = splitThinking(msgs[i].Content, "<think>", "</think>")
		}
	}
	return msgs
}

func templateMessages(msgs []message) []*templateMessage {
	out := make([]*templateMessage, len(msgs))
	for i, m := range msgs {
		tm := &templateMessage{
			Role: m.Role, Content: m.Content, Thinking: m.Thinking,
			ToolName: m.ToolName, ToolCallID: m.ToolCallID,
		}
		for _, c := range m.ToolCalls {
			var call templateToolCall
			call.ID = c.ID
			call.Function.Index = c.Function.Index
			call.Function.Name = c.Function.Name
			call.Function.Arguments = templateArgs(c.Function.Arguments)
			tm.ToolCalls = append(tm.ToolCalls, call)
		}
		out[i] = tm
	}
	return out
}

var templateSource string

type response struct {
	GoCapabilities   []string            `json:"go_capabilities"`
	ChatCapabilities []string            `json:"chat_template_capabilities"`
	Selected         string              `json:"selected"`
	ToolCallTag      string              `json:"tool_call_tag"`
	ThinkTags        []string            `json:"think_tags"`
	System           string              `json:"system"`
	Parameters       map[string][]string `json:"parameters"`
	Prompt           *string             `json:"prompt"`
	Error            string              `json:"error,omitempty"`
}

func run(req request) (response, error) {
	var out response
	mf, err := parseModelfile(req.Modelfile)
	if err != nil {
		return out, err
	}
	out.System, out.Parameters = mf.System, mf.Parameters
	templateSource = mf.Template
	tmpl, err := template.New("").Option("missingkey=zero").Parse(mf.Template)
	if err != nil {
		return out, fmt.Errorf("the TEMPLATE does not parse: %w", err)
	}
	if !identifiers(tmpl)["messages"] {
		return out, errors.New("the TEMPLATE does not read .Messages: ollama would use the legacy prompt path")
	}
	out.GoCapabilities = append([]string{}, goTemplateCapabilities(tmpl)...)
	out.ChatCapabilities = append([]string{}, chatTemplateCapabilities(req.ChatTemplate)...)
	sort.Strings(out.GoCapabilities)
	sort.Strings(out.ChatCapabilities)
	out.Selected = "go_template"
	if req.ChatTemplate != "" && preferChatTemplate(req.ChatTemplate, out.ChatCapabilities, tmpl, out.GoCapabilities) {
		out.Selected = "gguf_chat_template"
	}
	out.ToolCallTag = toolCallTag(tmpl)
	opening, closing := thinkTags(tmpl)
	out.ThinkTags = []string{opening, closing}

	// ChatHandler: what the model can do, then the think flag.
	var tools []any
	if len(req.Tools) > 0 {
		if err := json.Unmarshal(req.Tools, &tools); err != nil {
			return out, err
		}
	}
	if len(tools) > 0 && !contains(out.GoCapabilities, "tools") {
		out.Error = "does not support tools"
		return out, nil
	}
	think := req.Think
	if contains(out.GoCapabilities, "thinking") {
		if think == nil && req.ThinkDefault {
			on := true
			think = &on
		}
	} else if think != nil && *think {
		out.Error = "does not support thinking"
		return out, nil
	}
	msgs := req.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && mf.System != "" {
		msgs = append([]message{{Role: "system", Content: mf.System}}, msgs...)
	}
	msgs = filterThinkTags(msgs, req.ModelFamily)

	// Template.Execute with the chat path's values.
	var parsedTools templateTools
	if len(req.Tools) > 0 {
		if err := json.Unmarshal(req.Tools, &parsedTools); err != nil {
			return out, err
		}
	}
	system, collated := collate(msgs)
	values := map[string]any{
		"System":     system,
		"Messages":   templateMessages(collated),
		"Tools":      parsedTools,
		"Response":   "",
		"Think":      think != nil && *think,
		"ThinkLevel": "",
		"IsThinkSet": think != nil,
	}
	if think != nil {
		values["ThinkLevel"] = fmt.Sprint(*think)
	}
	var b bytes.Buffer
	if err := tmpl.Execute(&b, values); err != nil {
		return out, fmt.Errorf("the TEMPLATE fails: %w", err)
	}
	prompt := b.String()
	out.Prompt = &prompt
	return out, nil
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "render_ollama: bad request:", err)
		os.Exit(2)
	}
	out, err := run(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render_ollama:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		os.Exit(1)
	}
}
