"""Chat templates in the shape of Llama 3.1's and Qwen 2.5's tool handling, written for Tessera's
tests (not taken from those models): what matters is where they put the tool list, how they
write an assistant's calls (arguments as JSON objects) and the tool's results.

- LLAMA_STYLE: an `Environment: ipython` system turn, the tools as indented JSON in the first
  user turn, calls as `{"name", "parameters"}` objects (`; ` between parallel ones), results
  in `ipython` turns.
- QWEN_STYLE: ChatML; the tools as JSON lines inside `<tools>` in the system turn, calls as
  `<tool_call>` blocks, consecutive results as `<tool_response>` blocks of one user turn.
"""

LLAMA_STYLE = """\
{{- bos_token }}
{%- if messages[0].role == "system" %}
    {%- set system_text = messages[0].content | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set turns = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools %}
    {{- "Environment: ipython\\n\\n" }}
{%- endif %}
{{- system_text + "<|eot_id|>" }}
{%- for m in turns %}
    {%- if m.role == "user" and loop.first and tools %}
        {{- "<|start_header_id|>user<|end_header_id|>\\n\\n" }}
        {{- "You can call these functions. To call one, reply with only a JSON object "
            + "{\\"name\\": <function name>, \\"parameters\\": <object of arguments>}.\\n\\n" }}
        {%- for t in tools %}
            {{- (t | tojson(indent=2)) + "\\n\\n" }}
        {%- endfor %}
        {{- (m.content | trim) + "<|eot_id|>" }}
    {%- elif m.role == "assistant" and m.tool_calls %}
        {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
        {%- for tc in m.tool_calls %}
            {%- if not loop.first %}{{- "; " }}{%- endif %}
            {{- '{"name": "' + tc.function.name + '", "parameters": ' + (tc.function.arguments | tojson) + "}" }}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif m.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + (m.content | trim) + "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>" + m.role + "<|end_header_id|>\\n\\n" + (m.content | trim) + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
{%- endif %}
"""

QWEN_STYLE = """\
{%- if tools %}
    {{- "<|im_start|>system\\n" }}
    {%- if messages[0].role == "system" %}
        {{- messages[0].content + "\\n\\n" }}
    {%- endif %}
    {{- "# Tools\\n\\nThe functions below may be called. Each signature is one JSON line inside <tools></tools>:\\n<tools>" }}
    {%- for t in tools %}
        {{- "\\n" + (t | tojson) }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nTo call one, write its name and arguments as a JSON object inside <tool_call></tool_call>:\\n"
        + "<tool_call>\\n{\\"name\\": <name>, \\"arguments\\": <object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == "system" %}
    {{- "<|im_start|>system\\n" + messages[0].content + "<|im_end|>\\n" }}
{%- else %}
    {{- "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n" }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == "system" and loop.first %}
    {%- elif m.role == "assistant" and m.tool_calls %}
        {{- "<|im_start|>assistant" }}
        {%- if m.content %}
            {{- "\\n" + m.content }}
        {%- endif %}
        {%- for tc in m.tool_calls %}
            {{- "\\n<tool_call>\\n{\\"name\\": \\"" + tc.function.name + "\\", \\"arguments\\": "
                + (tc.function.arguments | tojson) + "}\\n</tool_call>" }}
        {%- endfor %}
        {{- "<|im_end|>\\n" }}
    {%- elif m.role == "tool" %}
        {%- if loop.first or loop.previtem.role != "tool" %}
            {{- "<|im_start|>user" }}
        {%- endif %}
        {{- "\\n<tool_response>\\n" + m.content + "\\n</tool_response>" }}
        {%- if loop.last or loop.nextitem.role != "tool" %}
            {{- "<|im_end|>\\n" }}
        {%- endif %}
    {%- else %}
        {{- "<|im_start|>" + m.role + "\\n" + m.content + "<|im_end|>\\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\\n" }}
{%- endif %}
"""
